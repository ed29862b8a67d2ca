//! Volumes in a libvirt storage pool on any host libvirt reaches (a local socket,
//! `qemu+ssh://`, `qemu+tcp://`): files uploaded through libvirt's volume stream and
//! verified by reading them back, small records, and qcow2 overlays made by libvirt itself.
//! Nothing here assumes that this process sees the host's file system.
//!
//! Every call blocks; run them on the blocking pool.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use quick_xml::Writer;
use quick_xml::events::BytesText;
use sha2::Digest;
use virt::connect::Connect;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use crate::error::{BackendError, Error, ErrorKind, Result};
use crate::types::HostId;

/// What can go wrong with a host's storage pool.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    #[error("{what} in pool {pool} on {host}")]
    Virt {
        what: String,
        pool: String,
        host: HostId,
        #[source]
        source: virt::error::Error,
    },
    #[error("cannot connect to libvirt on {host}")]
    Connect {
        host: HostId,
        #[source]
        source: virt::error::Error,
    },
    #[error("libvirt on {host} did not answer within {secs}s")]
    ConnectTimeout { host: HostId, secs: u64 },
    #[error("cannot start a thread to connect from")]
    Thread(#[source] std::io::Error),
    #[error("cannot read {}", .0.display())]
    Local(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot write volume xml")]
    Xml(#[source] std::io::Error),
    #[error("volume {name} on {host} reads back as sha256 {got}…, not the uploaded {expected}…")]
    Mismatch {
        name: String,
        host: HostId,
        expected: String,
        got: String,
    },
    #[cfg(feature = "glance")]
    #[error("volume {name} on {host} is larger than the {max} bytes a record may have")]
    TooLarge {
        name: String,
        host: HostId,
        max: u64,
    },
}

/// What a libvirt error means for the caller, by its code (every libvirt backend's).
pub(crate) fn virt_kind(e: &virt::error::Error) -> ErrorKind {
    match e.code() {
        Enum::Known(ErrorNumber::NoConnect | ErrorNumber::SystemError | ErrorNumber::Rpc) => {
            ErrorKind::Unavailable
        }
        Enum::Known(
            ErrorNumber::AuthFailed | ErrorNumber::AuthCancelled | ErrorNumber::AccessDenied,
        ) => ErrorKind::Unauthorized,
        Enum::Known(
            ErrorNumber::NoDomain | ErrorNumber::NoStoragePool | ErrorNumber::NoStorageVolume,
        ) => ErrorKind::NotFound,
        Enum::Known(ErrorNumber::DomExist | ErrorNumber::StorageVolExist) => {
            ErrorKind::AlreadyExists
        }
        Enum::Known(ErrorNumber::XmlError | ErrorNumber::XmlDetail | ErrorNumber::InvalidArg) => {
            ErrorKind::InvalidInput
        }
        _ => ErrorKind::Backend,
    }
}

impl BackendError for PoolError {
    const BACKEND: &'static str = "libvirt";

    fn kind(&self) -> ErrorKind {
        match self {
            PoolError::Virt { source, .. } | PoolError::Connect { source, .. } => virt_kind(source),
            PoolError::ConnectTimeout { .. } => ErrorKind::Unavailable,
            PoolError::Local(..)
            | PoolError::Thread(_)
            | PoolError::Xml(_)
            | PoolError::Mismatch { .. } => ErrorKind::Backend,
            #[cfg(feature = "glance")]
            PoolError::TooLarge { .. } => ErrorKind::Backend,
        }
    }
}

/// How long opening a connection to a host's libvirt may take (a remote host's SSH or
/// TCP handshake included) before the host counts as not answering.
pub(crate) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A connection to the libvirt of `host` (every libvirt backend connects through here),
/// opened within [`CONNECT_TIMEOUT`]: a host that does not answer is
/// [`ErrorKind::Unavailable`] (retryable), not a call that hangs.
pub(crate) fn connect(host: &HostId) -> Result<Connect> {
    connect_within(host, CONNECT_TIMEOUT)
}

fn connect_within(host: &HostId, limit: std::time::Duration) -> Result<Connect> {
    // libvirt prints every error to stderr by default; devvm returns them instead.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(virt::error::clear_error_callback);
    // libvirt's open has no time limit of its own: it runs on a thread of its own, which,
    // given up, closes the connection it may still get.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let uri = host.as_str().to_owned();
    let spawned = std::thread::Builder::new()
        .name("devvm-libvirt-connect".into())
        .spawn(move || {
            let _ = tx.send(Connect::open(Some(&uri)));
        });
    if let Err(e) = spawned {
        return Err(PoolError::Thread(e).into());
    }
    match rx.recv_timeout(limit) {
        Ok(r) => r.map_err(|source| {
            PoolError::Connect {
                host: host.clone(),
                source,
            }
            .into()
        }),
        Err(_) => Err(PoolError::ConnectTimeout {
            host: host.clone(),
            secs: limit.as_secs(),
        }
        .into()),
    }
}

/// A qcow2 overlay's backing file, as the host sees it.
pub(crate) struct Backing<'a> {
    /// The backing volume's path on the host.
    pub(crate) path: &'a str,
    /// `qcow2` or `raw`.
    pub(crate) format: &'a str,
}

/// One storage pool on one host, with an open connection.
pub(crate) struct Pool {
    // Dropped before the connection.
    pool: StoragePool,
    conn: Connect,
    name: String,
    host: HostId,
}

const CHUNK: usize = 1 << 20;

impl Pool {
    /// Opens the active pool `name` on `host`.
    pub(crate) fn open(host: &HostId, name: &str) -> Result<Pool> {
        let conn = connect(host)?;
        let pool = conn
            .lookup_storage_pool_by_name(name)
            .map_err(|source| PoolError::Virt {
                what: "cannot find the pool".into(),
                pool: name.to_owned(),
                host: host.clone(),
                source,
            })?;
        Ok(Pool {
            pool,
            conn,
            name: name.to_owned(),
            host: host.clone(),
        })
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> Error + '_ {
        let what = what.into();
        move |source| {
            PoolError::Virt {
                what,
                pool: self.name.clone(),
                host: self.host.clone(),
                source,
            }
            .into()
        }
    }

    /// The volume `name`, if it exists.
    pub(crate) fn volume(&self, name: &str) -> Result<Option<StorageVol>> {
        match self.pool.lookup_storage_vol_by_name(name) {
            Ok(v) => Ok(Some(v)),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoStorageVolume)) => Ok(None),
            Err(e) => Err(self.err(format!("cannot look up volume {name}"))(e)),
        }
    }

    #[cfg(feature = "glance")]
    /// The capacity (virtual size) of volume `vol` in bytes.
    pub(crate) fn capacity(&self, vol: &StorageVol, name: &str) -> Result<u64> {
        Ok(vol
            .info()
            .map_err(self.err(format!("cannot read volume {name}")))?
            .capacity)
    }

    /// The host's path of volume `vol`.
    pub(crate) fn path_of(&self, vol: &StorageVol) -> Result<String> {
        vol.path().map_err(self.err("cannot read a volume's path"))
    }

    /// Creates the volume `name` of `capacity` bytes exclusively (`None`: it exists).
    fn create(
        &self,
        name: &str,
        capacity: u64,
        format: &str,
        backing: Option<&Backing<'_>>,
    ) -> Result<Option<StorageVol>> {
        let xml = volume_xml(name, capacity, format, backing)?;
        match StorageVol::create_xml(&self.pool, &xml, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::StorageVolExist)) => Ok(None),
            Err(e) => Err(self.err(format!("cannot create volume {name}"))(e)),
        }
    }

    #[cfg(feature = "glance")]
    /// Creates the small volume `name` holding exactly `content`, exclusively: `false`
    /// when a volume of that name exists already (it is left as it is).
    pub(crate) fn create_record(&self, name: &str, content: &[u8]) -> Result<bool> {
        let Some(vol) = self.create(name, content.len() as u64, "raw", None)? else {
            return Ok(false);
        };
        if let Err(e) = self.upload(&vol, name, content) {
            let _ = vol.delete(0);
            return Err(e);
        }
        Ok(true)
    }

    #[cfg(feature = "glance")]
    /// The content of the small volume `name` (at most `max` bytes), if it exists.
    pub(crate) fn read_record(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(vol) = self.volume(name)? else {
            return Ok(None);
        };
        let len = vol
            .info()
            .map_err(self.err(format!("cannot read volume {name}")))?
            .capacity;
        if len > max {
            return Err(PoolError::TooLarge {
                name: name.to_owned(),
                host: self.host.clone(),
                max,
            }
            .into());
        }
        let mut out = Vec::with_capacity(len as usize);
        self.download(&vol, name, len, |chunk| out.extend_from_slice(chunk))?;
        Ok(Some(out))
    }

    /// Deletes the volume `name`: `false` when there was none.
    pub(crate) fn delete(&self, name: &str) -> Result<bool> {
        match self.volume(name)? {
            Some(v) => {
                v.delete(0)
                    .map_err(self.err(format!("cannot delete volume {name}")))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    #[cfg(feature = "glance")]
    /// Creates the qcow2 overlay `name` of `capacity` bytes on `backing`, exclusively
    /// (`None`: a volume of that name exists and is left alone). libvirt makes it on the host.
    pub(crate) fn create_overlay(
        &self,
        name: &str,
        capacity: u64,
        backing: &Backing<'_>,
    ) -> Result<Option<StorageVol>> {
        self.create(name, capacity, "qcow2", Some(backing))
    }

    /// Uploads the local file `local` as the new volume `name` (exclusively), reads it back
    /// and compares the sha256 of both sides; on any failure the volume is deleted again.
    /// Returns the volume and its sha256 (hex). `on_bytes` sees the running total.
    pub(crate) fn upload_file(
        &self,
        local: &Path,
        name: &str,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<Option<(StorageVol, String)>> {
        let local_err = |e| PoolError::Local(local.to_owned(), e);
        let mut file = File::open(local).map_err(local_err)?;
        let len = file.metadata().map_err(local_err)?.len();
        let Some(vol) = self.create(name, len, "raw", None)? else {
            return Ok(None);
        };
        let result = (|| {
            let stream = Stream::new(&self.conn, 0).map_err(self.err("cannot open a stream"))?;
            vol.upload(&stream, 0, len, 0)
                .map_err(self.err(format!("cannot upload to volume {name}")))?;
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = stream.abort();
                        return Err(local_err(e).into());
                    }
                };
                hasher.update(&buf[..n]);
                send_all(&stream, &buf[..n])
                    .map_err(self.err(format!("cannot upload to volume {name}")))?;
                total += n as u64;
                on_bytes(total);
            }
            stream
                .finish()
                .map_err(self.err(format!("cannot finish the upload of {name}")))?;
            let sent = hex(&hasher.finalize());
            let mut back = sha2::Sha256::new();
            self.download(&vol, name, len, |chunk| back.update(chunk))?;
            let got = hex(&back.finalize());
            if got != sent {
                return Err(PoolError::Mismatch {
                    name: name.to_owned(),
                    host: self.host.clone(),
                    expected: sent[..16].to_owned(),
                    got: got[..16].to_owned(),
                }
                .into());
            }
            Ok(sent)
        })();
        match result {
            Ok(sha) => Ok(Some((vol, sha))),
            Err(e) => {
                let _ = vol.delete(0);
                Err(e)
            }
        }
    }

    #[cfg(feature = "glance")]
    fn upload(&self, vol: &StorageVol, name: &str, content: &[u8]) -> Result<()> {
        let stream = Stream::new(&self.conn, 0).map_err(self.err("cannot open a stream"))?;
        vol.upload(&stream, 0, content.len() as u64, 0)
            .map_err(self.err(format!("cannot upload to volume {name}")))?;
        send_all(&stream, content).map_err(self.err(format!("cannot upload to volume {name}")))?;
        stream
            .finish()
            .map_err(self.err(format!("cannot finish the upload of {name}")))
    }

    fn download(
        &self,
        vol: &StorageVol,
        name: &str,
        len: u64,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<()> {
        let stream = Stream::new(&self.conn, 0).map_err(self.err("cannot open a stream"))?;
        vol.download(&stream, 0, len, 0)
            .map_err(self.err(format!("cannot read volume {name}")))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = stream
                .recv(&mut buf)
                .map_err(self.err(format!("cannot read volume {name}")))?;
            if n <= 0 {
                break;
            }
            sink(&buf[..n as usize]);
        }
        stream
            .finish()
            .map_err(self.err(format!("cannot finish reading volume {name}")))
    }
}

fn send_all(stream: &Stream, mut data: &[u8]) -> std::result::Result<(), virt::error::Error> {
    while !data.is_empty() {
        let n = stream.send(data)?;
        // A blocking stream sends something or fails; never spin on zero.
        let n = usize::try_from(n).unwrap_or(0).max(1).min(data.len());
        data = &data[n..];
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The XML of a new volume; every value goes through the XML writer.
fn volume_xml(
    name: &str,
    capacity: u64,
    format: &str,
    backing: Option<&Backing<'_>>,
) -> Result<String> {
    let mut w = Writer::new(Vec::new());
    let text = |s: &str| BytesText::new(s).into_owned();
    w.create_element("volume")
        .write_inner_content(|w| {
            w.create_element("name").write_text_content(text(name))?;
            w.create_element("capacity")
                .with_attribute(("unit", "bytes"))
                .write_text_content(text(&capacity.to_string()))?;
            w.create_element("allocation")
                .with_attribute(("unit", "bytes"))
                .write_text_content(text("0"))?;
            w.create_element("target").write_inner_content(|w| {
                w.create_element("format")
                    .with_attribute(("type", format))
                    .write_empty()?;
                Ok(())
            })?;
            if let Some(b) = backing {
                w.create_element("backingStore").write_inner_content(|w| {
                    w.create_element("path").write_text_content(text(b.path))?;
                    w.create_element("format")
                        .with_attribute(("type", b.format))
                        .write_empty()?;
                    Ok(())
                })?;
            }
            Ok(())
        })
        .map_err(PoolError::Xml)?;
    String::from_utf8(w.into_inner()).map_err(|e| PoolError::Xml(std::io::Error::other(e)).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A libvirt that accepts the connection and never answers: the open is given up
    /// at its time limit as a retryable "not answering", whatever the limit is.
    #[test]
    fn a_libvirt_that_never_answers_is_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("mute.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // Accepts and holds the connections, answers nothing.
        let held = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for c in listener.incoming().take(1) {
                conns.push(c);
            }
            conns
        });
        let uri = format!("qemu+unix:///system?socket={}", sock.display());
        let host = HostId::new(uri).unwrap();
        let e = connect_within(&host, std::time::Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(e.detail(), Some(PoolError::ConnectTimeout { .. })),
            "{e}"
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        drop(held);
    }

    #[test]
    fn volume_xml_escapes_every_value() {
        let xml = volume_xml(
            "a<b>&\"c",
            1 << 30,
            "qcow2",
            Some(&Backing {
                path: "/p/</path>x",
                format: "raw",
            }),
        )
        .unwrap();
        assert!(xml.contains("<name>a&lt;b&gt;&amp;&quot;c</name>"), "{xml}");
        assert!(xml.contains("<path>/p/&lt;/path&gt;x</path>"), "{xml}");
        assert!(
            xml.contains("<capacity unit=\"bytes\">1073741824</capacity>"),
            "{xml}"
        );
        assert!(
            xml.contains("<format type=\"raw\"/></backingStore>"),
            "{xml}"
        );
    }
}
