//! A small SSH client for bootstrapping guests, on `russh` (async, tokio).
//!
//! [`SshSession::connect`] logs in with a private key and verifies the server's host key
//! against the one the provisioner generated for the guest ([`HostKeyCheck::Expect`]):
//! any other key is refused with [`ErrorKind::Unauthorized`] before anything is sent.
//! There is no trust on first use; [`HostKeyCheck::AcceptAnyUnsafe`] exists only for
//! guests whose host key cannot be known in advance, and says so in its name.
//!
//! Commands run through `sh -c` (the lab's guest is busybox + dropbear, no bash), their
//! output arrives line by line, and secrets travel only on standard input: this module
//! never logs a command, and callers must never put a secret on a command line.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

use crate::error::{Error, ErrorKind, Result};

/// A failure of the SSH client. No variant holds key material: keys are named by their
/// file or their fingerprint.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SshError {
    #[error("the expected ssh host key is not an OpenSSH public key line")]
    HostKeyLine,
    #[error("cannot read ssh key {}", path.display())]
    KeyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ssh key {} is not an unencrypted OpenSSH private key", .0.display())]
    KeyFormat(PathBuf),
    #[error("cannot encode an ssh public key")]
    PublicKey(#[source] russh::keys::ssh_key::Error),
    /// The connection failed before a host key was refused: always worth another attempt
    /// while the guest's SSH server comes up, whatever its kind.
    #[error("ssh to {addr}: cannot connect")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: russh::Error,
    },
    /// A later step of the protocol failed (`what`: `login failed`, `cannot open a
    /// session`, ...).
    #[error("ssh to {addr}: {what}")]
    Protocol {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: russh::Error,
    },
    #[error("ssh to {addr}: {why}")]
    HostKeyRefused { addr: SocketAddr, why: String },
    #[error("ssh to {addr}: the guest refused key login as {user} (key {key})")]
    LoginRefused {
        addr: SocketAddr,
        user: String,
        key: String,
    },
    #[error("ssh to {addr} did not log in within {limit:?}")]
    LoginTimeout { addr: SocketAddr, limit: Duration },
    #[error("ssh to {0} failed")]
    Failed(SocketAddr),
    #[error("ssh to {0}: the guest refused to run a command")]
    CommandRefused(SocketAddr),
    #[error("ssh to {addr}: a command did not end within {limit:?}")]
    CommandTimeout { addr: SocketAddr, limit: Duration },
    #[error("file mode {0:o} is not a file mode")]
    FileMode(u32),
    #[error("a guest file path must be one line")]
    GuestPath,
    #[error("cannot write {path} on {ip} ({ended}{})", stderr.as_deref().map(|l| format!(": {l}")).unwrap_or_default())]
    Upload {
        path: String,
        ip: IpAddr,
        ended: String,
        stderr: Option<String>,
    },
}

impl SshError {
    fn kind(&self) -> ErrorKind {
        use SshError::*;
        match self {
            HostKeyLine | KeyRead { .. } | KeyFormat(_) | FileMode(_) | GuestPath => {
                ErrorKind::InvalidInput
            }
            Connect { source, .. } | Protocol { source, .. } => {
                if transient(source) {
                    ErrorKind::Unavailable
                } else {
                    ErrorKind::Backend
                }
            }
            HostKeyRefused { .. } | LoginRefused { .. } => ErrorKind::Unauthorized,
            LoginTimeout { .. } | CommandTimeout { .. } => ErrorKind::Timeout,
            Failed(_) => ErrorKind::Unavailable,
            PublicKey(_) | CommandRefused(_) | Upload { .. } => ErrorKind::Backend,
        }
    }
}

/// Not a [`BackendError`](crate::error::BackendError): SSH is not a backend of its own but
/// serves the `chef` and `shell` bootstrappers, so its errors set no backend name (the
/// pipeline sets the bootstrapper's).
impl From<SshError> for Error {
    fn from(e: SshError) -> Self {
        let retryable = matches!(e, SshError::Connect { .. });
        // A command past its time limit may still run on the guest (closing the channel
        // does not end it): running it again could run it twice at once.
        let never_again = matches!(e, SshError::CommandTimeout { .. });
        let err = Error::from_detail(e.kind(), e);
        if retryable {
            err.with_retryable(true)
        } else if never_again {
            err.with_retryable(false)
        } else {
            err
        }
    }
}

/// How the server's host key is checked.
#[derive(Clone)]
pub enum HostKeyCheck {
    /// Accept only this key (compared by its SSH wire encoding; comments do not matter).
    Expect(PublicKey),
    /// Accept whatever key the server presents. **Unsafe**: anyone who can answer on the
    /// guest's address gets the commands and the secrets sent on stdin. Only for guests
    /// whose host key the provisioner did not generate.
    AcceptAnyUnsafe,
}

impl HostKeyCheck {
    /// Expects the key in `line`, an OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
    /// A malformed line is [`ErrorKind::InvalidInput`].
    pub fn expect_line(line: &str) -> Result<HostKeyCheck> {
        PublicKey::from_openssh(line.trim())
            .map(HostKeyCheck::Expect)
            .map_err(|_| SshError::HostKeyLine.into())
    }
}

impl fmt::Debug for HostKeyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKeyCheck::Expect(k) => write!(f, "Expect({})", fingerprint(k)),
            HostKeyCheck::AcceptAnyUnsafe => f.write_str("AcceptAnyUnsafe"),
        }
    }
}

/// The SHA-256 fingerprint of `key`, as `ssh-keygen -l` prints it (`SHA256:...`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

/// Loads an unencrypted OpenSSH (or PEM) private key file. Errors name the file, never
/// its content.
pub fn load_private_key(path: &Path) -> Result<PrivateKey> {
    let text = crate::secret::read_secret_file(path).map_err(|source| SshError::KeyRead {
        path: path.to_owned(),
        source,
    })?;
    russh::keys::decode_secret_key(&text, None)
        .map_err(|_| SshError::KeyFormat(path.to_owned()).into())
}

/// The `authorized_keys` line of the public half of `key`, with `comment`.
pub fn authorized_key_line(key: &PrivateKey, comment: &str) -> Result<String> {
    let mut public = key.public_key().clone();
    public.set_comment(comment);
    public
        .to_openssh()
        .map_err(|e| SshError::PublicKey(e).into())
}

/// Quotes `s` for a POSIX shell (single quotes; `'` becomes `'\''`).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Where and how to connect.
#[derive(Clone)]
pub struct SshOptions {
    /// The guest's SSH address.
    pub addr: SocketAddr,
    /// The user to log in as (`root`).
    pub user: String,
    /// The private key to log in with.
    pub key: Arc<PrivateKey>,
    /// How the host key is checked.
    pub host_key: HostKeyCheck,
    /// Time limit of one connection attempt (TCP, key exchange and login).
    pub connect_timeout: Duration,
    /// How many connection attempts are made while the guest's SSH server comes up (at
    /// least 1). A refused host key or login is never retried.
    pub attempts: u32,
    /// Pause between attempts.
    pub retry_delay: Duration,
    /// Time limit of one command run over the session ([`SshSession::run`], uploads
    /// included), from its start to its end.
    pub command_timeout: Duration,
}

/// The default [`SshOptions::command_timeout`]: a chef-client run on a slow guest fits.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1800);

impl SshOptions {
    /// Options with 5 attempts, 2 s apart, a 15 s limit per attempt, and
    /// [`DEFAULT_COMMAND_TIMEOUT`] per command.
    pub fn new(
        addr: SocketAddr,
        user: impl Into<String>,
        key: Arc<PrivateKey>,
        host_key: HostKeyCheck,
    ) -> Self {
        SshOptions {
            addr,
            user: user.into(),
            key,
            host_key,
            connect_timeout: Duration::from_secs(15),
            attempts: 5,
            retry_delay: Duration::from_secs(2),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
}

impl fmt::Debug for SshOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshOptions")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("key", &fingerprint(self.key.public_key()))
            .field("host_key", &self.host_key)
            .field("connect_timeout", &self.connect_timeout)
            .field("attempts", &self.attempts)
            .field("retry_delay", &self.retry_delay)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

/// Which stream a line of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Its exit status, when the server reported one.
    pub exit_status: Option<u32>,
    /// The signal that killed it, when it was killed.
    pub exit_signal: Option<String>,
    /// The last non-empty line it printed (stdout or stderr).
    pub last_line: Option<String>,
    /// The last non-empty line it printed on stderr.
    pub last_stderr_line: Option<String>,
}

impl CommandOutcome {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }

    /// The line that best says why it failed: the last line of stderr, else the last
    /// line of output.
    pub fn error_line(&self) -> Option<&str> {
        self.last_stderr_line
            .as_deref()
            .or(self.last_line.as_deref())
    }

    /// `exit status N`, `killed by signal S` or `no exit status`.
    pub fn describe(&self) -> String {
        match (&self.exit_status, &self.exit_signal) {
            (Some(n), _) => format!("exit status {n}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "no exit status".to_owned(),
        }
    }
}

/// What the host key check saw, for mapping russh's error.
#[derive(Default)]
struct Seen {
    refused: Option<String>,
}

struct Checker {
    check: HostKeyCheck,
    seen: Arc<Mutex<Seen>>,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = match (&self.check, key) {
            (HostKeyCheck::AcceptAnyUnsafe, _) => Ok(()),
            (HostKeyCheck::Expect(want), PublicKeyOrCertificate::PublicKey { key, .. }) => {
                if key.key_data() == want.key_data() {
                    Ok(())
                } else {
                    Err(format!(
                        "host key mismatch: the server presented {} {}, expected {}",
                        key.algorithm(),
                        fingerprint(key),
                        fingerprint(want)
                    ))
                }
            }
            (HostKeyCheck::Expect(_), PublicKeyOrCertificate::Certificate(_)) => Err(
                "host key mismatch: the server presented a certificate, expected a plain key"
                    .to_owned(),
            ),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut s) = self.seen.lock() {
                    s.refused = Some(why);
                }
                Ok(false)
            }
        }
    }
}

/// An authenticated SSH connection to one guest.
pub struct SshSession {
    handle: Handle<Checker>,
    addr: SocketAddr,
    command_timeout: Duration,
}

impl fmt::Debug for SshSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshSession")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Longest line handed to the callback; longer output is split.
const MAX_LINE: usize = 64 * 1024;

struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn new() -> Self {
        Lines { buf: Vec::new() }
    }

    fn push(&mut self, data: &[u8], mut emit: impl FnMut(String)) {
        self.buf.extend_from_slice(data);
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let rest = self.buf.split_off(i + 1);
            let line = std::mem::replace(&mut self.buf, rest);
            emit(to_line(&line[..i]));
        }
        while self.buf.len() > MAX_LINE {
            let rest = self.buf.split_off(MAX_LINE);
            let line = std::mem::replace(&mut self.buf, rest);
            emit(to_line(&line));
        }
    }

    fn finish(&mut self, mut emit: impl FnMut(String)) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            emit(to_line(&line));
        }
    }
}

fn to_line(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether `e` may pass when tried again: [`ErrorKind::Unavailable`] (retryable), else
/// [`ErrorKind::Backend`].
fn transient(e: &russh::Error) -> bool {
    matches!(
        e,
        russh::Error::IO(_)
            | russh::Error::Disconnect
            | russh::Error::HUP
            | russh::Error::ConnectionTimeout
            | russh::Error::KeepaliveTimeout
            | russh::Error::InactivityTimeout
    )
}

fn ssh_error(addr: SocketAddr, what: &'static str, source: russh::Error) -> Error {
    SshError::Protocol { addr, what, source }.into()
}

impl SshSession {
    /// Connects and logs in, retrying while the guest's SSH server comes up.
    ///
    /// * A host key other than the expected one is [`ErrorKind::Unauthorized`] (`host key
    ///   mismatch`), never retried; nothing is sent to such a server.
    /// * A refused login is [`ErrorKind::Unauthorized`].
    /// * A guest that does not answer is [`ErrorKind::Unavailable`] or
    ///   [`ErrorKind::Timeout`] after the last attempt.
    pub async fn connect(opts: &SshOptions) -> Result<SshSession> {
        let attempts = opts.attempts.max(1);
        let mut last = None;
        for attempt in 1..=attempts {
            match tokio::time::timeout(opts.connect_timeout, Self::connect_once(opts)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) if !e.is_retryable() => return Err(e),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(
                        SshError::LoginTimeout {
                            addr: opts.addr,
                            limit: opts.connect_timeout,
                        }
                        .into(),
                    )
                }
            }
            if attempt < attempts {
                tracing::debug!(addr = %opts.addr, attempt, "ssh not ready yet; retrying");
                tokio::time::sleep(opts.retry_delay).await;
            }
        }
        Err(last.unwrap_or_else(|| SshError::Failed(opts.addr).into()))
    }

    async fn connect_once(opts: &SshOptions) -> Result<SshSession> {
        let addr = opts.addr;
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let checker = Checker {
            check: opts.host_key.clone(),
            seen: seen.clone(),
        };
        let mut handle = match client::connect(config, addr, checker).await {
            Ok(h) => h,
            Err(e) => {
                let refused = seen.lock().ok().and_then(|mut s| s.refused.take());
                return Err(match refused {
                    Some(why) => SshError::HostKeyRefused { addr, why },
                    None => SshError::Connect { addr, source: e },
                }
                .into());
            }
        };
        let hash = if opts.key.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| ssh_error(addr, "cannot negotiate", e))?
                .flatten()
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(
                &opts.user,
                PrivateKeyWithHashAlg::new(opts.key.clone(), hash),
            )
            .await
            .map_err(|e| ssh_error(addr, "login failed", e))?;
        if !auth.success() {
            return Err(SshError::LoginRefused {
                addr,
                user: opts.user.clone(),
                key: fingerprint(opts.key.public_key()),
            }
            .into());
        }
        Ok(SshSession {
            handle,
            addr,
            command_timeout: opts.command_timeout,
        })
    }

    /// The address this session is connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs `command` with `sh -c`, writes `stdin` (if any) to it and closes its input,
    /// and hands each line of its output to `on_line` as it arrives. Returns how it ended;
    /// a non-zero exit is not an error here (see [`CommandOutcome::success`]).
    ///
    /// The command is never logged; never put a secret in it (pass secrets on `stdin`).
    ///
    /// A command still running after the session's
    /// [`command_timeout`](SshOptions::command_timeout) is [`ErrorKind::Timeout`]; its
    /// channel is closed.
    pub async fn run(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        on_line: &mut (dyn FnMut(OutputStream, &str) + Send),
    ) -> Result<CommandOutcome> {
        let limit = self.command_timeout;
        match tokio::time::timeout(limit, self.run_unbounded(command, stdin, on_line)).await {
            Ok(r) => r,
            Err(_) => Err(SshError::CommandTimeout {
                addr: self.addr,
                limit,
            }
            .into()),
        }
    }

    async fn run_unbounded(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        on_line: &mut (dyn FnMut(OutputStream, &str) + Send),
    ) -> Result<CommandOutcome> {
        let addr = self.addr;
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| ssh_error(addr, "cannot open a session", e))?;
        channel
            .exec(true, format!("sh -c {}", sh_quote(command)))
            .await
            .map_err(|e| ssh_error(addr, "cannot start a command", e))?;
        let (mut rx, tx) = channel.split();
        let writer = async {
            if let Some(data) = stdin {
                tx.data(data).await?;
            }
            tx.eof().await
        };
        let reader = async {
            let mut out = Lines::new();
            let mut err = Lines::new();
            // (last line of any stream, last line of stderr)
            let mut last: (Option<String>, Option<String>) = (None, None);
            let mut outcome = CommandOutcome {
                exit_status: None,
                exit_signal: None,
                last_line: None,
                last_stderr_line: None,
            };
            let mut emit =
                |stream: OutputStream,
                 line: String,
                 last: &mut (Option<String>, Option<String>)| {
                    on_line(stream, &line);
                    if !line.trim().is_empty() {
                        if stream == OutputStream::Stderr {
                            last.1 = Some(line.clone());
                        }
                        last.0 = Some(line);
                    }
                };
            let mut refused = false;
            while let Some(msg) = rx.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        out.push(&data, |l| emit(OutputStream::Stdout, l, &mut last))
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        err.push(&data, |l| emit(OutputStream::Stderr, l, &mut last))
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        outcome.exit_status = Some(exit_status)
                    }
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        outcome.exit_signal = Some(format!("{signal_name:?}"))
                    }
                    ChannelMsg::Failure => {
                        refused = true;
                        break;
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            out.finish(|l| emit(OutputStream::Stdout, l, &mut last));
            err.finish(|l| emit(OutputStream::Stderr, l, &mut last));
            (outcome.last_line, outcome.last_stderr_line) = last;
            (outcome, refused)
        };
        let (written, (outcome, refused)) = tokio::join!(writer, reader);
        if refused {
            return Err(SshError::CommandRefused(addr).into());
        }
        if let Err(e) = written
            && outcome.exit_status.is_none()
            && outcome.exit_signal.is_none()
        {
            return Err(ssh_error(addr, "cannot send input to a command", e));
        }
        Ok(outcome)
    }

    /// Writes `contents` to `path` on the guest with `mode`: the file is created under
    /// `umask 077` (so it is never readable by others, not even briefly), filled from
    /// stdin, then `chmod`ed. The contents never appear on a command line.
    pub async fn upload(&self, path: &str, mode: u32, contents: &[u8]) -> Result<()> {
        check_upload(path, mode)?;
        let p = sh_quote(path);
        let cmd = format!("umask 077; cat > {p} && chmod {mode:04o} {p}");
        let mut last_err = None;
        let outcome = self
            .run(&cmd, Some(contents), &mut |stream, line| {
                if stream == OutputStream::Stderr {
                    last_err = Some(line.to_owned());
                }
            })
            .await?;
        if !outcome.success() {
            return Err(SshError::Upload {
                path: path.to_owned(),
                ip: self.addr.ip(),
                ended: outcome.describe(),
                stderr: last_err,
            }
            .into());
        }
        Ok(())
    }

    /// Runs `script` with the guest's `sh` (one command, one round trip), handing each
    /// line of its output to `on_line` as [`run`](Self::run) does; the lines of the
    /// script's [markers](GuestScript::marker) are handed over too. A non-zero exit is not
    /// an error here: the last marker seen tells how far the script got.
    pub async fn run_script(
        &self,
        script: &GuestScript,
        on_line: &mut (dyn FnMut(OutputStream, &str) + Send),
    ) -> Result<CommandOutcome> {
        self.run("sh -s", Some(&script.render()), on_line).await
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// A script for the guest's `sh`, run as one command by [`SshSession::run_script`]:
/// files written as here-documents on the command's input (so their contents, secrets
/// included, never appear on a command line), commands, and marker lines the caller
/// watches for to know how far it got. Files are written under `umask 077` (commands run
/// with the session's umask), and the script stops at the first step that fails, with
/// that step's exit status. Its `Debug` shows the steps, never a
/// file's contents.
#[derive(Default, Clone)]
pub struct GuestScript {
    parts: Vec<Part>,
}

#[derive(Clone)]
enum Part {
    Command(String),
    File {
        path: String,
        mode: u32,
        contents: Vec<u8>,
    },
    Marker(String),
}

impl fmt::Debug for GuestScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_list();
        for p in &self.parts {
            match p {
                Part::Command(c) => l.entry(&format_args!("command {c:?}")),
                Part::File {
                    path,
                    mode,
                    contents,
                } => l.entry(&format_args!(
                    "file {path:?} mode {mode:04o}, {} bytes",
                    contents.len()
                )),
                Part::Marker(m) => l.entry(&format_args!("marker {m:?}")),
            };
        }
        l.finish()
    }
}

impl GuestScript {
    /// An empty script.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `command` (a shell command line, with `/dev/null` as its input; never put a
    /// secret in it). If it fails, the script ends with its exit status.
    pub fn command(&mut self, command: &str) -> &mut Self {
        self.parts.push(Part::Command(command.to_owned()));
        self
    }

    /// Writes `contents` to `path` as [`SshSession::upload`] does: created under
    /// `umask 077`, filled, then `chmod`ed to `mode`. Any bytes are carried exactly (text
    /// ending in a newline as it is, anything else base64-encoded and decoded by the
    /// guest's `base64 -d`).
    ///
    /// A mode above `0o7777` or an empty path, or one with a NUL or a newline, is
    /// [`ErrorKind::InvalidInput`].
    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<&mut Self> {
        check_upload(path, mode)?;
        self.parts.push(Part::File {
            path: path.to_owned(),
            mode,
            contents: contents.to_vec(),
        });
        Ok(self)
    }

    /// Prints `line` (one line) on the command's output when the script gets there.
    pub fn marker(&mut self, line: &str) -> &mut Self {
        self.parts
            .push(Part::Marker(line.replace(['\n', '\r'], " ")));
        self
    }

    /// The script's text, as `sh -s` reads it.
    fn render(&self) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        // Encoded now: the delimiter must not occur in what each here-document carries.
        let bodies: Vec<Option<Vec<u8>>> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::File { contents, .. } if heredoc_safe(contents) => Some(contents.clone()),
                Part::File { contents, .. } => {
                    let text = b64.encode(contents);
                    let mut wrapped = Vec::with_capacity(text.len() + text.len() / 76 + 1);
                    for chunk in text.as_bytes().chunks(76) {
                        wrapped.extend_from_slice(chunk);
                        wrapped.push(b'\n');
                    }
                    Some(wrapped)
                }
                _ => None,
            })
            .collect();
        let delimiter = loop {
            let d = format!("DEVVM_EOF_{:032x}", rand::random::<u128>());
            if !bodies.iter().flatten().any(|b| contains(b, d.as_bytes())) {
                break d;
            }
        };
        // Only the files are written under umask 077 (each in a subshell): the commands
        // run with the session's own umask, so what they make is not private by accident.
        let mut out = Vec::new();
        for (part, body) in self.parts.iter().zip(&bodies) {
            match part {
                Part::Command(c) => {
                    // An empty group is a syntax error: an empty command does nothing.
                    let c = if c.trim().is_empty() { ":" } else { c.as_str() };
                    out.extend_from_slice(
                        format!("{{\n{c}\n}} < /dev/null || exit $?\n").as_bytes(),
                    )
                }
                Part::Marker(m) => {
                    out.extend_from_slice(format!("printf '%s\\n' {}\n", sh_quote(m)).as_bytes())
                }
                Part::File {
                    path,
                    mode,
                    contents,
                } => {
                    let p = sh_quote(path);
                    let writer = if heredoc_safe(contents) {
                        "cat"
                    } else {
                        "base64 -d"
                    };
                    out.extend_from_slice(
                        format!("(umask 077 && {writer} > {p} <<'{delimiter}'\n").as_bytes(),
                    );
                    out.extend_from_slice(body.as_deref().unwrap_or_default());
                    out.extend_from_slice(
                        format!("{delimiter}\n) || exit $?\nchmod {mode:04o} -- {p} || exit $?\n")
                            .as_bytes(),
                    );
                }
            }
        }
        out
    }
}

fn check_upload(path: &str, mode: u32) -> Result<()> {
    if mode > 0o7777 {
        return Err(SshError::FileMode(mode).into());
    }
    if path.is_empty() || path.contains('\0') || path.contains('\n') {
        return Err(SshError::GuestPath.into());
    }
    Ok(())
}

/// Whether a quoted here-document carries `contents` exactly as they are: it always ends
/// what it carries with a newline and cannot hold a NUL byte.
fn heredoc_safe(contents: &[u8]) -> bool {
    contents.ends_with(b"\n") && !contents.contains(&0)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a script the way the guest does (`sh -s`, the script on its input), here with
    /// this machine's `sh`: (exit status, output).
    fn run_locally(script: &GuestScript) -> (i32, String) {
        use std::io::Write as _;
        let mut child = std::process::Command::new("sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&script.render())
            .expect("script");
        let out = child.wait_with_output().expect("sh ran");
        (
            out.status.code().expect("exited"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    #[test]
    fn a_guest_script_writes_files_exactly_with_their_modes_and_stops_at_a_failure() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
        let binary: Vec<u8> = (0..=255u8).chain([0, b'\n', 0]).collect();
        let tricky = b"$HOME `id` 'quoted' \"x\"\nDEVVM_EOF_\n\tindented\n".to_vec();
        let mut script = GuestScript::new();
        script
            .command(&format!("mkdir -p {}", sh_quote(&path("sub"))))
            .file(
                &path("sub/secret.pem"),
                0o600,
                b"-----BEGIN KEY-----\nabc\n",
            )
            .unwrap()
            .file(&path("binary"), 0o644, &binary)
            .unwrap()
            .file(&path("no-newline"), 0o640, b"last line")
            .unwrap()
            .file(&path("empty"), 0o600, b"")
            .unwrap()
            .file(&path("tricky"), 0o755, &tricky)
            .unwrap()
            .marker("files written")
            .command("exit 7")
            .marker("never printed")
            .command(&format!("touch {}", sh_quote(&path("never"))));
        let (code, out) = run_locally(&script);
        assert_eq!(code, 7, "the failing command's status ends the script");
        // Commands keep the session's umask; only the files were written under 077.
        let mut umasks = GuestScript::new();
        umasks
            .command("umask 022")
            .file(&path("private"), 0o644, b"x\n")
            .unwrap()
            .command(&format!("mkdir {}", sh_quote(&path("made-by-a-command"))))
            .command("");
        assert_eq!(run_locally(&umasks).0, 0, "an empty command does nothing");
        let m = std::fs::metadata(dir.path().join("made-by-a-command"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(
            m, 0o755,
            "a command's directory under the session's umask 022"
        );
        assert_eq!(out, "files written\n", "markers up to the failure only");
        assert!(!dir.path().join("never").exists());
        for (name, mode, contents) in [
            ("sub/secret.pem", 0o600, &b"-----BEGIN KEY-----\nabc\n"[..]),
            ("binary", 0o644, &binary),
            ("no-newline", 0o640, b"last line"),
            ("empty", 0o600, b""),
            ("tricky", 0o755, &tricky),
        ] {
            let p = dir.path().join(name);
            assert_eq!(std::fs::read(&p).unwrap(), contents, "{name}");
            let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            assert_eq!(m, mode, "{name}");
        }
        // Contents ride on the script's input only: Debug shows sizes, and the one
        // command line ("sh -s") holds nothing of them.
        let debug = format!("{script:?}");
        assert!(
            debug.contains("secret.pem") && debug.contains("24 bytes"),
            "{debug}"
        );
        assert!(!debug.contains("BEGIN KEY"), "{debug}");
        // A failing write stops the script too.
        let mut script = GuestScript::new();
        script
            .file(&path("missing-dir/f"), 0o600, b"x\n")
            .unwrap()
            .marker("after");
        let (code, out) = run_locally(&script);
        assert_ne!(code, 0);
        assert_eq!(out, "");
        // Bad input is refused before anything runs.
        let mut script = GuestScript::new();
        for (p, mode) in [
            ("", 0o600),
            ("/a\nb", 0o600),
            ("/a\0b", 0o600),
            ("/a", 0o10000),
        ] {
            let e = script.file(p, mode, b"x").expect_err(p);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        }
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn lines_are_split_and_flushed() {
        let mut l = Lines::new();
        let mut got = Vec::new();
        l.push(b"one\r\ntw", |s| got.push(s));
        l.push(b"o\nthree", |s| got.push(s));
        l.finish(|s| got.push(s));
        assert_eq!(got, ["one", "two", "three"]);
        let mut got = Vec::new();
        let mut l = Lines::new();
        l.push(&vec![b'x'; MAX_LINE + 10], |s| got.push(s));
        l.finish(|s| got.push(s));
        assert_eq!(
            got.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE, 10]
        );
    }

    #[test]
    fn expected_host_keys_parse_and_debug_shows_only_fingerprints() {
        let key = crate::seed::HostKey::generate().expect("key");
        let check = HostKeyCheck::expect_line(&key.public).expect("parses");
        let dbg = format!("{check:?}");
        assert!(dbg.starts_with("Expect(SHA256:"), "{dbg}");
        let e = HostKeyCheck::expect_line("ssh-ed25519 notbase64").err();
        assert!(
            matches!(
                e.as_ref().and_then(|e| e.detail()),
                Some(SshError::HostKeyLine)
            ),
            "{e:?}"
        );
        // SSH serves the chef and shell bootstrappers: its errors name no backend.
        assert_eq!(e.and_then(|e| e.backend_name().map(str::to_owned)), None);
        let private = russh::keys::decode_secret_key(
            secrecy::ExposeSecret::expose_secret(&key.private),
            None,
        )
        .expect("decodes");
        let line = authorized_key_line(&private, "devvm-bootstrap").expect("line");
        assert!(
            line.starts_with("ssh-ed25519 ") && line.ends_with(" devvm-bootstrap"),
            "{line}"
        );
        let opts = SshOptions::new(
            "127.0.0.1:22".parse().expect("addr"),
            "root",
            Arc::new(private),
            check,
        );
        let dbg = format!("{opts:?}");
        assert!(!dbg.contains("PRIVATE"), "{dbg}");
    }
}
