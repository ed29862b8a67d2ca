//! The seed's button as a web page: type a user name, press "Deploy", and watch every
//! step of the provision arrive over a websocket; the list of VMs has a delete button per
//! VM that streams the teardown the same way.
//!
//! ```text
//! cargo run --example web -- --config devvm.toml [--listen 127.0.0.1:8080]
//! ```
//!
//! Without sign-in configured the page trusts whoever reaches it, so the server listens on
//! a loopback address only. With sign-in it can face a team:
//!
//! ```text
//! web --config devvm.toml --listen 0.0.0.0:8443 --tls-cert c.pem --tls-key k.pem \
//!     --sign-in ldap --admin-group cn=vm-admins,ou=groups,dc=example --public-host devvm.example
//! web --config devvm.toml --listen 10.0.0.5:8080 --trusted-header X-Remote-User \
//!     --trusted-proxy 10.0.0.2 --public-host devvm.example
//! ```
//!
//! `--sign-in ldap` shows a login form; the password goes to an LDAP bind as the user
//! (through the config's `[users]` directory) and nowhere else, and a signed, HttpOnly,
//! SameSite=Strict session cookie is issued. `--trusted-header` takes the user from a
//! header set by an authenticating proxy, accepted only from `--trusted-proxy` addresses.
//! A signed-in user provisions only for themselves and sees and acts only on their own
//! VMs; members of `--admin-group` act for anyone. A non-loopback address is refused
//! without sign-in, and without TLS or a trusted proxy. Every action is a JSON line in
//! the audit log (`--audit-log`, default `web-audit.jsonl` in the state directory).
//! Connections, runs per user and in total, the wait for a first message and a stalled
//! send are all capped (`--help`).
//!
//! One websocket carries one run. The browser sends one command,
//!
//! ```text
//! {"op":"provision","user":"alice"}   or   {"op":"deprovision","vm":"alice-3fa2b1"}
//! {"op":"migrate","vm":"alice-3fa2b1","to":"qemu+ssh://vmhost2/system"}
//! ```
//!
//! (and, while a provision runs, `{"op":"cancel"}`), and receives
//!
//! ```text
//! {"type":"accepted","operation":"provision","request_id":"…","vm":"alice-3fa2b1"}
//! {"type":"event","event":{…}}        every event of this run, and of no other, as it happens
//! {"type":"done","operation":"provision","vm":{…}}      or   {"type":"error","error":{…}}
//! ```
//!
//! where `event` is a [`devvm_core::Event`] and `error` a [`devvm_core::ErrorInfo`] in
//! their serde JSON. A user or VM name that fails validation, an action on another user's
//! VM and a run over a limit are such error messages. `GET /api/vms` is `list()` as JSON
//! (the caller's own VMs, or all for an admin); `GET /api/me` says who is signed in;
//! `POST /api/login` (`{"user":..,"password":..}`) and `POST /api/logout` sign in and out;
//! `GET /api/status` shows an admin the open connections and runs against their limits.

#![allow(clippy::print_stdout)] // prints the address it listens on, for people and scripts

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use devvm_core::{
    CancelToken, Error, ErrorKind, Event, HostId, Operation, ProvisionRequest, Provisioner,
    RunHandle, SecretString, UserName, Vm, VmName,
};
use serde::{Deserialize, Serialize};

#[path = "web/auth.rs"]
mod auth;
#[path = "web/listen.rs"]
mod listen;

use auth::{Audit, AuditEntry, Limits, Principal, RunSlot, Sessions, Via};

/// Directory calls for sign-in and the proxy header at once, at most.
const DIRECTORY_CALLS: usize = 8;
use listen::{Incoming, Peer};

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// No inline script, no foreign origin: even a bug that put data into markup could not
/// run it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The seed's button as a web page.
#[derive(Debug, Parser)]
#[command(name = "web", about = "devvm's web page: deploy a VM with one button")]
struct Args {
    /// The devvm config file.
    #[arg(long)]
    config: PathBuf,
    /// Where to listen (IP:PORT; port 0 picks a free one). Without sign-in, loopback only.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Sign in with a user name and password, checked by an LDAP bind as the user.
    #[arg(long, value_enum)]
    sign_in: Option<SignInKind>,
    /// Take the user from this header (e.g. X-Remote-User), set by an authenticating
    /// reverse proxy; only from --trusted-proxy addresses.
    #[arg(long, requires = "trusted_proxy")]
    trusted_header: Option<String>,
    /// An address of the authenticating proxy (repeat for several).
    #[arg(long, requires = "trusted_header")]
    trusted_proxy: Vec<IpAddr>,
    /// Members of this group (an LDAP DN) may act on anyone's VMs.
    #[arg(long)]
    admin_group: Option<String>,
    /// A host name the page is reached by besides loopback (repeat for several).
    #[arg(long)]
    public_host: Vec<String>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The audit log (JSON lines); default web-audit.jsonl in the state directory.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// How long a sign-in lasts, in hours.
    #[arg(long, default_value_t = 8)]
    session_hours: u64,
    /// Open websockets at most.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Runs going at once at most, in total.
    #[arg(long, default_value_t = 16)]
    max_runs: usize,
    /// Runs going at once at most, per user.
    #[arg(long, default_value_t = 3)]
    max_runs_per_user: usize,
    /// Seconds a new websocket may take to send its command.
    #[arg(long, default_value_t = 10)]
    first_message_secs: u64,
    /// Seconds one send to a browser may take before its connection is dropped (the run
    /// goes on).
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SignInKind {
    /// A login form; the password is checked by an LDAP bind as the user.
    Ldap,
}

/// The trusted header of an authenticating proxy and the addresses it comes from.
#[derive(Debug, Clone)]
struct Proxy {
    header: HeaderName,
    from: Vec<IpAddr>,
}

/// How the server knows who is asking.
#[derive(Debug, Clone)]
struct SignIn {
    ldap: bool,
    proxy: Option<Proxy>,
    admin_group: Option<String>,
    session: Duration,
}

impl SignIn {
    fn enabled(&self) -> bool {
        self.ldap || self.proxy.is_some()
    }
}

/// Checks the listen address against how the server is protected: a non-loopback address
/// needs sign-in, and TLS or a trusted proxy in front.
fn check_listen(s: &str, sign_in: &SignIn, tls: bool) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("--listen {s:?}: expected IP:PORT, such as 127.0.0.1:8080"))?;
    if addr.ip().is_loopback() {
        return Ok(addr);
    }
    if !sign_in.enabled() {
        return Err(format!(
            "--listen {addr}: refusing a non-loopback address without sign-in; the page would \
             let anyone who reaches it act for any user. Listen on 127.0.0.1, or add \
             --sign-in ldap or --trusted-header"
        ));
    }
    if !tls && (sign_in.ldap || sign_in.proxy.is_none()) {
        return Err(format!(
            "--listen {addr}: refusing a non-loopback address without TLS: passwords and \
             session cookies would cross the network in clear. Add --tls-cert and --tls-key, \
             or sign in only through an authenticating proxy in front (--trusted-header, \
             --trusted-proxy, without --sign-in ldap)"
        ));
    }
    Ok(addr)
}

#[derive(Clone)]
struct App {
    provisioner: Provisioner,
    port: u16,
    tls: bool,
    public_hosts: Arc<Vec<String>>,
    sign_in: Arc<SignIn>,
    sessions: Arc<Sessions>,
    /// Caps concurrent directory calls of sign-in and the proxy header.
    directory: Arc<tokio::sync::Semaphore>,
    audit: Arc<Audit>,
    limits: Arc<Limits>,
}

impl App {
    /// Writes `p`'s `action` to the audit log: `error` is `None` when it succeeded.
    fn audit(
        &self,
        p: &Principal,
        action: &str,
        vm: Option<&str>,
        for_user: Option<&str>,
        error: Option<&Error>,
    ) {
        let (result, error) = match error {
            None => ("ok", None),
            Some(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Unauthorized
                        | ErrorKind::Exhausted
                        | ErrorKind::InvalidInput
                        | ErrorKind::NotFound
                ) =>
            {
                ("refused", Some(e.info()))
            }
            Some(e) => ("failed", Some(e.info())),
        };
        self.audit.record(&AuditEntry {
            who: p.who(),
            via: Some(p.via),
            peer: p.peer,
            action,
            vm,
            for_user,
            result,
            error,
        });
    }

    /// Who is asking: the trusted proxy's header (from a trusted proxy only), else a
    /// valid session cookie; on a server without sign-in, the local user. `None` when
    /// sign-in is on and the request carries neither.
    async fn principal(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> devvm_core::Result<Option<Principal>> {
        if !self.sign_in.enabled() {
            return Ok(Some(Principal {
                user: None,
                admin: true,
                via: Via::Loopback,
                peer,
            }));
        }
        if let Some(proxy) = &self.sign_in.proxy
            && proxy.from.contains(&peer.to_canonical())
            && headers.contains_key(&proxy.header)
        {
            // Exactly one value: a proxy that appends rather than replaces would
            // otherwise let the client's own header through.
            let mut values = headers.get_all(&proxy.header).iter();
            let (Some(value), None) = (values.next(), values.next()) else {
                return Err(Error::unauthorized(
                    "the trusted header came more than once; refused",
                ));
            };
            let name = value
                .to_str()
                .map_err(|_| Error::invalid_input("the trusted header is not text"))?;
            let _directory = self.directory_slot().await;
            let users = &self.provisioner.backends().users;
            // The user must exist and may own VMs, as for a provision; the directory's
            // spelling of the name is the one that owns VMs.
            let user = users.find_user(&UserName::new(name)?).await?.name;
            let admin = self.is_admin(&user).await?;
            return Ok(Some(Principal {
                user: Some(user),
                admin,
                via: Via::Proxy,
                peer,
            }));
        }
        if self.sign_in.ldap {
            let cookies = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok());
            let Some((id, live)) =
                auth::session_cookie(cookies, self.tls).and_then(|t| self.sessions.get(t))
            else {
                return Ok(None);
            };
            let mut admin = live.admin;
            if live.checked.elapsed() >= auth::RECHECK {
                // Still a user who may own VMs, and still (or no longer) an admin?
                let _directory = self.directory_slot().await;
                match self
                    .provisioner
                    .backends()
                    .users
                    .find_user(&live.user)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Unauthorized) => {
                        self.sessions.end(&id);
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
                admin = self.is_admin(&live.user).await?;
                self.sessions.checked(&id, admin);
            }
            return Ok(Some(Principal {
                user: Some(live.user),
                admin,
                via: Via::Ldap,
                peer,
            }));
        }
        Ok(None)
    }

    /// One of a few slots for directory calls made for sign-in and the proxy header, so
    /// a flood of requests cannot flood the directory.
    async fn directory_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.directory
            .acquire()
            .await
            .unwrap_or_else(|_| unreachable!("the semaphore is never closed"))
    }

    async fn is_admin(&self, user: &UserName) -> devvm_core::Result<bool> {
        match &self.sign_in.admin_group {
            Some(group) => {
                self.provisioner
                    .backends()
                    .users
                    .is_member(user, group)
                    .await
            }
            None => Ok(false),
        }
    }
}

/// What the browser asks for: the first message on a websocket.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Provision {
        /// The user the VM is for; a signed-in user's own when absent.
        #[serde(default)]
        user: Option<String>,
    },
    Deprovision {
        vm: String,
    },
    Migrate {
        vm: String,
        to: String,
    },
    Cancel,
}

/// What the server sends on a websocket.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply<'a> {
    Accepted {
        operation: Operation,
        request_id: Option<&'a str>,
        vm: &'a VmName,
    },
    Event {
        event: &'a Event,
    },
    Done {
        operation: Operation,
        #[serde(skip_serializing_if = "Option::is_none")]
        vm: Option<&'a Vm>,
    },
    Error {
        error: devvm_core::ErrorInfo,
    },
}

/// A websocket with a time limit on every send: a browser that stops reading is dropped
/// once one send waits longer than the limit, instead of holding the server.
struct Socket {
    ws: WebSocket,
    idle: Duration,
}

impl Socket {
    /// Sends `reply`; false once the browser is gone or stopped reading.
    async fn send(&mut self, reply: &Reply<'_>) -> bool {
        let Ok(text) = serde_json::to_string(reply) else {
            return false;
        };
        matches!(
            tokio::time::timeout(self.idle, self.ws.send(Message::Text(text.into()))).await,
            Ok(Ok(()))
        )
    }

    async fn send_error(&mut self, error: &Error) {
        let _ = self
            .send(&Reply::Error {
                error: error.info(),
            })
            .await;
    }

    /// The next text message; `None` when the socket closes first.
    async fn next_text(&mut self) -> Option<String> {
        while let Some(Ok(msg)) = self.ws.recv().await {
            match msg {
                Message::Text(t) => return Some(t.as_str().to_owned()),
                Message::Close(_) => return None,
                _ => {}
            }
        }
        None
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(self.idle, self.ws.send(Message::Close(None))).await;
    }
}

/// One websocket, one run.
async fn session(
    ws: WebSocket,
    app: App,
    who: Principal,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut socket = Socket {
        ws,
        idle: app.limits.idle,
    };
    let Some(_slot) = slot else {
        let e = Error::new(
            ErrorKind::Exhausted,
            format!(
                "the server has {} connections open (its limit); try again in a moment",
                app.limits.max_connections
            ),
        );
        socket.send_error(&e).await;
        return socket.close().await;
    };
    let text = match tokio::time::timeout(app.limits.first_message, socket.next_text()).await {
        Ok(Some(text)) => text,
        Ok(None) => return,
        Err(_) => {
            let e = Error::new(
                ErrorKind::Timeout,
                format!(
                    "no command within {} s; open a new connection to try again",
                    app.limits.first_message.as_secs()
                ),
            );
            socket.send_error(&e).await;
            return socket.close().await;
        }
    };
    let command = match serde_json::from_str::<Command>(&text) {
        Ok(c) => c,
        Err(e) => {
            let error = Error::invalid_input(format!("bad command: {e}"));
            socket.send_error(&error).await;
            return socket.close().await;
        }
    };
    let outcome = match command {
        Command::Provision { user } => provision(&mut socket, &app, &who, user).await,
        Command::Deprovision { vm } => deprovision(&mut socket, &app, &who, &vm).await,
        Command::Migrate { vm, to } => migrate(&mut socket, &app, &who, &vm, &to).await,
        Command::Cancel => Err(Error::invalid_input("no run to cancel on this connection")),
    };
    if let Err(error) = outcome {
        socket.send_error(&error).await;
    }
    socket.close().await;
}

/// The VM `vm` if `who` may act on it.
async fn owned_vm(
    app: &App,
    who: &Principal,
    vm: &str,
) -> devvm_core::Result<(VmName, Option<Vm>)> {
    let name = VmName::new(vm)?;
    let found = app.provisioner.get(&name).await?;
    match &found {
        Some(v) => who.check_may_act_for(&v.owner, &format!("vm {name}"))?,
        // A VM half made or half removed is not listed; only an admin may clean it up.
        None if !who.admin => {
            return Err(Error::not_found(format!("no vm named {name} of yours")));
        }
        None => {}
    }
    Ok((name, found))
}

async fn provision(
    socket: &mut Socket,
    app: &App,
    who: &Principal,
    user: Option<String>,
) -> devvm_core::Result<()> {
    let checked = async {
        let user = match (user, &who.user) {
            (Some(u), _) if !u.trim().is_empty() => UserName::new(u.trim())?,
            (_, Some(me)) => me.clone(),
            (_, None) => return Err(Error::invalid_input("a user name is required")),
        };
        who.check_may_act_for(&user, &format!("a VM for {user}"))
            .map_err(|_| {
                Error::unauthorized(format!(
                    "you are signed in as {}: you may provision only for yourself, not for {user}",
                    who.who()
                ))
            })?;
        let request = ProvisionRequest::new(user.clone());
        let resolved = app.provisioner.resolve(&request)?;
        let slot = app.limits.run(who.counted_as(&user))?;
        Ok((user, request, resolved, slot))
    }
    .await;
    let (user, request, resolved, slot) = match checked {
        Ok(c) => c,
        Err(e) => {
            app.audit(who, "provision", None, None, Some(&e));
            return Err(e);
        }
    };
    let id = resolved.request_id.clone();
    let cancel = CancelToken::new();
    let run = app.provisioner.start_provision(request, cancel.clone());
    let accepted = Reply::Accepted {
        operation: Operation::Provision,
        request_id: Some(id.as_str()),
        vm: &resolved.name,
    };
    let vm = resolved.name.to_string();
    let audit = Audited {
        app: app.clone(),
        who: who.clone(),
        action: "provision",
        vm,
        for_user: Some(user.to_string()),
    };
    stream(socket, accepted, run, Some, Some(cancel), audit, slot).await
}

async fn deprovision(
    socket: &mut Socket,
    app: &App,
    who: &Principal,
    vm: &str,
) -> devvm_core::Result<()> {
    let checked = async {
        let (name, found) = owned_vm(app, who, vm).await?;
        let slot = app.limits.run(who.counted_as_owner_of(found.as_ref()))?;
        Ok((name, found, slot))
    }
    .await;
    let (name, found, slot) = match checked {
        Ok(c) => c,
        Err(e) => {
            app.audit(who, "deprovision", Some(vm), None, Some(&e));
            return Err(e);
        }
    };
    let request_id = found.as_ref().map(|vm| vm.request_id.clone());
    let run = app.provisioner.start_deprovision(name.clone());
    let accepted = Reply::Accepted {
        operation: Operation::Deprovision,
        request_id: request_id.as_ref().map(|id| id.as_str()),
        vm: &name,
    };
    let audit = Audited {
        app: app.clone(),
        who: who.clone(),
        action: "deprovision",
        vm: name.to_string(),
        for_user: found.map(|v| v.owner.to_string()),
    };
    stream(socket, accepted, run, |()| None, None, audit, slot).await
}

async fn migrate(
    socket: &mut Socket,
    app: &App,
    who: &Principal,
    vm: &str,
    to: &str,
) -> devvm_core::Result<()> {
    let checked = async {
        let to = HostId::new(to)?;
        let (name, found) = owned_vm(app, who, vm).await?;
        let slot = app.limits.run(who.counted_as_owner_of(found.as_ref()))?;
        Ok((name, found, to, slot))
    }
    .await;
    let (name, found, to, slot) = match checked {
        Ok(c) => c,
        Err(e) => {
            app.audit(who, "migrate", Some(vm), None, Some(&e));
            return Err(e);
        }
    };
    let request_id = found.as_ref().map(|vm| vm.request_id.clone());
    let run = app.provisioner.start_migrate(name.clone(), to);
    let accepted = Reply::Accepted {
        operation: Operation::Migrate,
        request_id: request_id.as_ref().map(|id| id.as_str()),
        vm: &name,
    };
    let audit = Audited {
        app: app.clone(),
        who: who.clone(),
        action: "migrate",
        vm: name.to_string(),
        for_user: found.map(|v| v.owner.to_string()),
    };
    stream(socket, accepted, run, Some, None, audit, slot).await
}

/// An accepted run, written to the audit log with its outcome when it ends.
struct Audited {
    app: App,
    who: Principal,
    action: &'static str,
    vm: String,
    for_user: Option<String>,
}

impl Audited {
    fn record(&self, error: Option<&Error>) {
        self.app.audit(
            &self.who,
            self.action,
            Some(&self.vm),
            self.for_user.as_deref(),
            error,
        );
    }

    /// The browser left: the run goes on, holding its slot until it ends, and its
    /// outcome is still audited.
    fn finish_in_background<T: Send + 'static>(self, run: RunHandle<T>, slot: RunSlot) {
        tokio::spawn(async move {
            let outcome = run.finish().await;
            drop(slot);
            self.record(outcome.as_ref().err());
        });
    }
}

/// Sends `accepted` (a [`Reply::Accepted`]), then this run's events until the run ends,
/// then its outcome. The run is its own task: a browser that goes away stops the
/// forwarding, not the run, whose slot and audit line then wait for its end.
async fn stream<T: Send + 'static>(
    socket: &mut Socket,
    accepted: Reply<'_>,
    mut run: RunHandle<T>,
    vm_of: impl FnOnce(T) -> Option<Vm>,
    cancel: Option<CancelToken>,
    audit: Audited,
    slot: RunSlot,
) -> devvm_core::Result<()> {
    let operation = match &accepted {
        Reply::Accepted { operation, .. } => *operation,
        _ => unreachable!("stream starts with the accepted reply"),
    };
    if !socket.send(&accepted).await {
        audit.finish_in_background(run, slot);
        return Ok(());
    }
    loop {
        tokio::select! {
            e = run.next_event() => match e {
                Some(e) => {
                    if !socket.send(&Reply::Event { event: &e }).await {
                        audit.finish_in_background(run, slot);
                        return Ok(());
                    }
                }
                None => break,
            },
            msg = socket.ws.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    match (serde_json::from_str::<Command>(t.as_str()), &cancel) {
                        (Ok(Command::Cancel), Some(token)) => token.cancel(),
                        _ => {
                            let e = Error::invalid_input("this connection runs one command; only cancel is accepted now");
                            socket.send_error(&e).await;
                        }
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    audit.finish_in_background(run, slot);
                    return Ok(());
                }
                Some(Ok(_)) => {}
            },
        }
    }
    let outcome = run.finish().await;
    drop(slot);
    audit.record(outcome.as_ref().err());
    let vm = vm_of(outcome?);
    let _ = socket
        .send(&Reply::Done {
            operation,
            vm: vm.as_ref(),
        })
        .await;
    Ok(())
}

fn unauthorized() -> Response {
    let e = Error::unauthorized("sign in first");
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({ "error": e.info() })),
    )
        .into_response()
}

fn error_response(e: &Error) -> Response {
    let status = match e.kind() {
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unavailable | ErrorKind::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, axum::Json(serde_json::json!({ "error": e.info() }))).into_response()
}

/// The principal of a request, or the response refusing it.
async fn who_or_refuse(app: &App, headers: &HeaderMap, peer: Peer) -> Result<Principal, Response> {
    match app.principal(headers, peer.0.ip()).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(unauthorized()),
        Err(e) => Err(error_response(&e)),
    }
}

async fn ws(
    upgrade: WebSocketUpgrade,
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let who = match who_or_refuse(&app, &headers, peer).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let slot = app.limits.connection();
    let cap = app.limits.message_bytes;
    upgrade
        .max_message_size(cap)
        .max_frame_size(cap)
        .on_upgrade(move |socket| session(socket, app, who, slot))
}

async fn list(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let who = match who_or_refuse(&app, &headers, peer).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match app.provisioner.list().await {
        Ok(mut vms) => {
            vms.retain(|vm| who.may_act_for(&vm.owner));
            axum::Json(vms).into_response()
        }
        Err(e) => error_response(&e),
    }
}

async fn hosts(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = who_or_refuse(&app, &headers, peer).await {
        return r;
    }
    match app.provisioner.hosts().await {
        Ok(hosts) => axum::Json(hosts).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn me(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let ways: Vec<&str> = [
        app.sign_in.ldap.then_some("ldap"),
        app.sign_in.proxy.as_ref().map(|_| "proxy"),
    ]
    .into_iter()
    .flatten()
    .collect();
    match app.principal(&headers, peer.0.ip()).await {
        Ok(p) => axum::Json(serde_json::json!({
            "sign_in": ways,
            "signed_in": p.is_some(),
            "user": p.as_ref().and_then(|p| p.user.as_ref()),
            "admin": p.as_ref().is_some_and(|p| p.admin),
        }))
        .into_response(),
        Err(e) => error_response(&e),
    }
}

/// What the server holds now, against its limits (admins only).
async fn status(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    match who_or_refuse(&app, &headers, peer).await {
        Ok(p) if p.admin => {}
        Ok(_) => {
            return error_response(&Error::unauthorized(
                "only an admin may see the server's status",
            ));
        }
        Err(r) => return r,
    }
    let (connections, runs) = app.limits.in_use();
    axum::Json(serde_json::json!({
        "connections": connections,
        "max_connections": app.limits.max_connections,
        "runs": runs,
        "max_runs": app.limits.max_runs,
        "max_runs_per_user": app.limits.max_runs_per_user,
    }))
    .into_response()
}

/// The login form's body. The password is only ever handed to the directory's bind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    user: String,
    password: String,
}

async fn login(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: axum::Json<Login>,
) -> Response {
    let anonymous = Principal {
        user: None,
        admin: false,
        via: Via::Ldap,
        peer: peer.0.ip(),
    };
    if !app.sign_in.ldap {
        return error_response(&Error::invalid_input("this server has no password sign-in"));
    }
    let Login { user, password } = body.0;
    let password = SecretString::from(password);
    let outcome = async {
        let user = UserName::new(user.trim())
            .map_err(|_| Error::unauthorized("wrong user name or password"))?;
        let _directory = app.directory_slot().await;
        let found = app
            .provisioner
            .backends()
            .users
            .authenticate(&user, &password)
            .await?;
        // The directory's spelling of the name (ALICE signs in as alice).
        let admin = app.is_admin(&found.name).await?;
        Ok::<_, Error>((found.name, admin))
    }
    .await;
    match outcome {
        Ok((user, admin)) => {
            let p = Principal {
                user: Some(user.clone()),
                admin,
                ..anonymous
            };
            app.audit(&p, "sign_in", None, None, None);
            let token = match app.sessions.start(&user, admin, app.sign_in.session) {
                Ok(t) => t,
                Err(e) => return error_response(&Error::backend(e)),
            };
            let cookie = auth::set_cookie(&token, app.sign_in.session, app.tls);
            (
                [(header::SET_COOKIE, cookie)],
                axum::Json(serde_json::json!({ "user": user, "admin": admin })),
            )
                .into_response()
        }
        Err(e) => {
            let attempted = user.trim();
            let shown = if UserName::new(attempted).is_ok() {
                attempted
            } else {
                "(invalid name)"
            };
            app.audit.record(&AuditEntry {
                who: shown,
                via: Some(Via::Ldap),
                peer: peer.0.ip(),
                action: "sign_in",
                vm: None,
                for_user: None,
                result: "refused",
                error: Some(e.info()),
            });
            error_response(&sign_in_error(&e))
        }
    }
}

/// What a refused sign-in tells the browser: who exists, and how the directory is set
/// up, stay in the audit log. A right password of a non-member is told why.
fn sign_in_error(e: &Error) -> Error {
    match e.kind() {
        ErrorKind::Unauthorized if e.to_string().contains("not a member") => {
            Error::unauthorized(e.to_string())
        }
        ErrorKind::Unavailable | ErrorKind::Timeout => Error::new(
            ErrorKind::Unavailable,
            "the user directory cannot be reached; try again in a moment",
        ),
        _ => Error::unauthorized("wrong user name or password"),
    }
}

async fn logout(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Ok(Some(p)) = app.principal(&headers, peer.0.ip()).await {
        app.audit(&p, "sign_out", None, None, None);
    }
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    if let Some((id, _)) = auth::session_cookie(cookies, app.tls).and_then(|t| app.sessions.get(t))
    {
        // The token is dead from now on, wherever a copy of it is.
        app.sessions.end(&id);
    }
    let cookie = auth::set_cookie("", Duration::ZERO, app.tls);
    (
        [(header::SET_COOKIE, cookie)],
        axum::Json(serde_json::json!({})),
    )
        .into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Whether `host` (a `Host` header, or the authority of an `Origin`) names this server:
/// on loopback with its port, or a configured public name (with or without a port).
/// Refusing other names defeats DNS rebinding; refusing other origins stops a foreign page
/// from driving the websocket.
fn our_host(host: &str, port: u16, public: &[String]) -> bool {
    ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|h| host == format!("{h}:{port}"))
        || public.iter().any(|p| {
            host.eq_ignore_ascii_case(p)
                || host
                    .rsplit_once(':')
                    .is_some_and(|(h, _)| h.eq_ignore_ascii_case(p))
        })
}

fn allowed(headers: &HeaderMap, port: u16, public: &[String]) -> bool {
    let text = |v: &HeaderValue| v.to_str().ok().map(str::to_owned);
    let host_ok = headers
        .get(header::HOST)
        .and_then(text)
        .is_some_and(|h| our_host(&h, port, public));
    let origin_ok = match headers.get(header::ORIGIN).and_then(text) {
        None => true,
        Some(o) => o
            .strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
            .is_some_and(|h| our_host(h, port, public)),
    };
    host_ok && origin_ok
}

async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    if !allowed(req.headers(), app.port, &app.public_hosts) {
        return (StatusCode::FORBIDDEN, "wrong host or origin\n").into_response();
    }
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if app.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    response
}

fn router(app: App) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/api/vms", get(list))
        .route("/api/hosts", get(hosts))
        .route("/api/me", get(me))
        .route("/api/status", get(status))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/ws", get(ws))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

async fn run(args: Args) -> Result<(), String> {
    let proxy = match &args.trusted_header {
        Some(h) => Some(Proxy {
            header: HeaderName::try_from(h.as_str())
                .map_err(|_| format!("--trusted-header {h:?} is not a header name"))?,
            from: args.trusted_proxy.clone(),
        }),
        None => None,
    };
    let sign_in = SignIn {
        ldap: args.sign_in == Some(SignInKind::Ldap),
        proxy,
        admin_group: args.admin_group.clone(),
        session: Duration::from_secs(args.session_hours.clamp(1, 24 * 31) * 3600),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(listen::tls_config(c, k)?),
        _ => None,
    };
    let addr = check_listen(&args.listen, &sign_in, tls.is_some())?;
    let provisioner = Provisioner::from_config(&args.config).map_err(|e| e.to_string())?;
    let audit_path = args
        .audit_log
        .clone()
        .unwrap_or_else(|| provisioner.state_dir().join("web-audit.jsonl"));
    let audit = Audit::open(&audit_path)?;
    // Whatever a killed earlier server left unfinished is finished or rolled back first.
    let report = provisioner.recover().await.map_err(|e| e.to_string())?;
    let recovered = report.completed.len() + report.rolled_back.len() + report.removed.len();
    if recovered > 0 {
        eprintln!("web: recovered {recovered} interrupted run(s)");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let app = App {
        provisioner,
        port: addr.port(),
        tls: tls.is_some(),
        public_hosts: Arc::new(args.public_host.clone()),
        sign_in: Arc::new(sign_in),
        sessions: Arc::new(Sessions::new()?),
        directory: Arc::new(tokio::sync::Semaphore::new(DIRECTORY_CALLS)),
        audit: Arc::new(audit),
        limits: Arc::new(Limits::new(
            args.max_connections.clamp(1, 65_536),
            args.max_runs.max(1),
            args.max_runs_per_user.max(1),
            Duration::from_secs(args.first_message_secs.max(1)),
            Duration::from_secs(args.idle_secs.max(1)),
        )),
    };
    // Every TCP connection counts, not only websockets: page loads and API calls get
    // room beyond the websockets' cap, and past it the server stops accepting for a
    // moment instead of running out of file descriptors.
    let tcp_cap = app.limits.max_connections.saturating_add(256);
    let incoming = Incoming::new(listener, tls, tcp_cap).map_err(|e| e.to_string())?;
    println!(
        "devvm web: listening on {scheme}://{addr}/ (pid {}, audit log {})",
        std::process::id(),
        audit_path.display()
    );
    axum::serve(
        incoming,
        router(app).into_make_service_with_connect_info::<Peer>(),
    )
    .await
    .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("web: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("web: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign_in(ldap: bool, proxy: bool) -> SignIn {
        SignIn {
            ldap,
            proxy: proxy.then(|| Proxy {
                header: HeaderName::from_static("x-remote-user"),
                from: vec![[10, 0, 0, 2].into()],
            }),
            admin_group: None,
            session: Duration::from_secs(3600),
        }
    }

    #[test]
    fn non_loopback_needs_sign_in_and_tls_or_a_proxy() {
        let none = sign_in(false, false);
        assert!(check_listen("127.0.0.1:8080", &none, false).is_ok());
        assert!(check_listen("[::1]:0", &none, false).is_ok());
        for bad in ["0.0.0.0:8080", "10.99.0.1:80", "[::]:8080"] {
            let e = check_listen(bad, &none, true).expect_err(bad);
            assert!(e.contains("non-loopback") && e.contains("sign-in"), "{e}");
        }
        assert!(check_listen("localhost", &none, false).is_err());
        let ldap = sign_in(true, false);
        let e = check_listen("0.0.0.0:8443", &ldap, false).expect_err("no TLS");
        assert!(e.contains("without TLS"), "{e}");
        assert!(check_listen("0.0.0.0:8443", &ldap, true).is_ok());
        assert!(check_listen("0.0.0.0:8080", &sign_in(false, true), false).is_ok());
        let e = check_listen("0.0.0.0:8080", &sign_in(true, true), false)
            .expect_err("passwords in clear past the proxy");
        assert!(e.contains("without TLS"), "{e}");
    }

    #[test]
    fn only_our_host_and_origin() {
        let mut h = HeaderMap::new();
        let allowed = |h: &HeaderMap, port| allowed(h, port, &[]);
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(allowed(&h, 8080));
        assert!(!allowed(&h, 8081));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!allowed(&h, 8080));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:8080"),
        );
        assert!(allowed(&h, 8080));
        h.insert(
            header::HOST,
            HeaderValue::from_static("rebound.example:8080"),
        );
        assert!(!allowed(&h, 8080));
        // A configured public name, with or without a port, over https too.
        let public = ["devvm.example".to_owned()];
        h.insert(header::HOST, HeaderValue::from_static("devvm.example"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://devvm.example:8443"),
        );
        assert!(super::allowed(&h, 8443, &public));
        assert!(!super::allowed(&h, 8443, &[]));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://devvm.example.evil"),
        );
        assert!(!super::allowed(&h, 8443, &public));
    }

    #[test]
    fn commands_parse_and_reject_unknown_fields() {
        assert!(matches!(
            serde_json::from_str::<Command>(r#"{"op":"provision","user":"alice"}"#),
            Ok(Command::Provision { .. })
        ));
        assert!(serde_json::from_str::<Command>(r#"{"op":"provision","user":"a","x":1}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"op":"format_disk"}"#).is_err());
    }
}
