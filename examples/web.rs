//! The seed's button as a web page: type a user name, press "Deploy", and watch every
//! step of the provision arrive over a websocket; the list of VMs has a delete button per
//! VM that streams the teardown the same way.
//!
//! ```text
//! cargo run --example web -- --config devvm.toml [--listen 127.0.0.1:8080]
//! ```
//!
//! The page has no authentication, so the server listens on a loopback address only and
//! refuses any other. It is a thin layer over [`Provisioner`]: one websocket carries one
//! run. The browser sends one command,
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
//! their serde JSON. A user or VM name that fails validation is such an error message.
//! `GET /api/vms` is `list()` as JSON.

#![allow(clippy::print_stdout)] // prints the address it listens on, for people and scripts

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use devvm_core::{
    CancelToken, Error, Event, HostId, Operation, ProvisionRequest, Provisioner, RunHandle,
    UserName, Vm, VmName,
};
use serde::{Deserialize, Serialize};

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// No inline script, no foreign origin: even a bug that put data into markup could not
/// run it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Args {
    config: PathBuf,
    listen: SocketAddr,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut config = None;
    let mut listen = "127.0.0.1:8080".to_owned();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => config = Some(it.next().ok_or("--config needs a path")?),
            "--listen" => listen = it.next().ok_or("--listen needs ADDRESS:PORT")?,
            "-h" | "--help" => {
                return Err("usage: web --config devvm.toml [--listen 127.0.0.1:8080]".to_owned());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        config: config.ok_or("--config PATH is required")?.into(),
        listen: loopback_address(&listen)?,
    })
}

/// Parses `--listen`, refusing anything but a loopback address.
fn loopback_address(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("--listen {s:?}: expected IP:PORT, such as 127.0.0.1:8080"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--listen {addr}: refusing a non-loopback address; the page has no \
             authentication, so it serves loopback only (127.0.0.1 or [::1])"
        ));
    }
    Ok(addr)
}

#[derive(Clone)]
struct App {
    provisioner: Provisioner,
    port: u16,
}

/// What the browser asks for: the first message on a websocket.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Provision { user: String },
    Deprovision { vm: String },
    Migrate { vm: String, to: String },
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

/// Sends `reply`; false once the browser is gone.
async fn send(socket: &mut WebSocket, reply: &Reply<'_>) -> bool {
    match serde_json::to_string(reply) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

async fn send_error(socket: &mut WebSocket, error: &Error) {
    let _ = send(
        socket,
        &Reply::Error {
            error: error.info(),
        },
    )
    .await;
}

/// The next text message; `None` when the socket closes first.
async fn next_text(socket: &mut WebSocket) -> Option<String> {
    while let Some(Ok(msg)) = socket.recv().await {
        match msg {
            Message::Text(t) => return Some(t.as_str().to_owned()),
            Message::Close(_) => return None,
            _ => {}
        }
    }
    None
}

/// One websocket, one run.
async fn session(mut socket: WebSocket, app: App) {
    let Some(text) = next_text(&mut socket).await else {
        return;
    };
    let command = match serde_json::from_str::<Command>(&text) {
        Ok(c) => c,
        Err(e) => {
            let error = Error::invalid_input(format!("bad command: {e}"));
            return send_error(&mut socket, &error).await;
        }
    };
    let outcome = match command {
        Command::Provision { user } => provision(&mut socket, &app, &user).await,
        Command::Deprovision { vm } => deprovision(&mut socket, &app, &vm).await,
        Command::Migrate { vm, to } => migrate(&mut socket, &app, &vm, &to).await,
        Command::Cancel => Err(Error::invalid_input("no run to cancel on this connection")),
    };
    if let Err(error) = outcome {
        send_error(&mut socket, &error).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}

async fn provision(socket: &mut WebSocket, app: &App, user: &str) -> devvm_core::Result<()> {
    let request = ProvisionRequest::new(UserName::new(user)?);
    let resolved = app.provisioner.resolve(&request)?;
    let id = resolved.request_id.clone();
    let accepted = Reply::Accepted {
        operation: Operation::Provision,
        request_id: Some(id.as_str()),
        vm: &resolved.name,
    };
    if !send(socket, &accepted).await {
        return Ok(());
    }
    let cancel = CancelToken::new();
    let run = app.provisioner.start_provision(request, cancel.clone());
    stream(socket, run, Some, Some(cancel), Operation::Provision).await
}

async fn deprovision(socket: &mut WebSocket, app: &App, vm: &str) -> devvm_core::Result<()> {
    let name = VmName::new(vm)?;
    let request_id = app.provisioner.get(&name).await?.map(|vm| vm.request_id);
    let accepted = Reply::Accepted {
        operation: Operation::Deprovision,
        request_id: request_id.as_ref().map(|id| id.as_str()),
        vm: &name,
    };
    if !send(socket, &accepted).await {
        return Ok(());
    }
    let run = app.provisioner.start_deprovision(name);
    stream(socket, run, |()| None, None, Operation::Deprovision).await
}

async fn migrate(socket: &mut WebSocket, app: &App, vm: &str, to: &str) -> devvm_core::Result<()> {
    let name = VmName::new(vm)?;
    let to = HostId::new(to)?;
    let request_id = app.provisioner.get(&name).await?.map(|vm| vm.request_id);
    let accepted = Reply::Accepted {
        operation: Operation::Migrate,
        request_id: request_id.as_ref().map(|id| id.as_str()),
        vm: &name,
    };
    if !send(socket, &accepted).await {
        return Ok(());
    }
    let run = app.provisioner.start_migrate(name, to);
    stream(socket, run, Some, None, Operation::Migrate).await
}

/// Forwards this run's events to the socket until the run ends, then its outcome. The
/// run is its own task: a browser that goes away stops the forwarding, not the run.
async fn stream<T: Send + 'static>(
    socket: &mut WebSocket,
    mut run: RunHandle<T>,
    vm_of: impl FnOnce(T) -> Option<Vm>,
    cancel: Option<CancelToken>,
    operation: Operation,
) -> devvm_core::Result<()> {
    loop {
        tokio::select! {
            e = run.next_event() => match e {
                Some(e) => {
                    if !send(socket, &Reply::Event { event: &e }).await {
                        return Ok(());
                    }
                }
                None => break,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    match (serde_json::from_str::<Command>(t.as_str()), &cancel) {
                        (Ok(Command::Cancel), Some(token)) => token.cancel(),
                        _ => {
                            let e = Error::invalid_input("this connection runs one command; only cancel is accepted now");
                            send_error(socket, &e).await;
                        }
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return Ok(()),
                Some(Ok(_)) => {}
            },
        }
    }
    let vm = vm_of(run.finish().await?);
    let _ = send(
        socket,
        &Reply::Done {
            operation,
            vm: vm.as_ref(),
        },
    )
    .await;
    Ok(())
}

async fn ws(ws: WebSocketUpgrade, State(app): State<App>) -> Response {
    ws.max_message_size(64 * 1024)
        .on_upgrade(move |socket| session(socket, app))
}

async fn list(State(app): State<App>) -> Response {
    match app.provisioner.list().await {
        Ok(vms) => axum::Json(vms).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({ "error": e.info() })),
        )
            .into_response(),
    }
}

async fn hosts(State(app): State<App>) -> Response {
    match app.provisioner.hosts().await {
        Ok(hosts) => axum::Json(hosts).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({ "error": e.info() })),
        )
            .into_response(),
    }
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

/// Whether `host` (a `Host` header, or the authority of an `Origin`) names this server
/// on loopback. Refusing other names defeats DNS rebinding; refusing other origins stops
/// a foreign page from driving the websocket.
fn our_host(host: &str, port: u16) -> bool {
    ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|h| host == format!("{h}:{port}"))
}

fn allowed(headers: &HeaderMap, port: u16) -> bool {
    let text = |v: &HeaderValue| v.to_str().ok().map(str::to_owned);
    let host_ok = headers
        .get(header::HOST)
        .and_then(text)
        .is_some_and(|h| our_host(&h, port));
    let origin_ok = match headers.get(header::ORIGIN).and_then(text) {
        None => true,
        Some(o) => o.strip_prefix("http://").is_some_and(|h| our_host(h, port)),
    };
    host_ok && origin_ok
}

async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    if !allowed(req.headers(), app.port) {
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
        .route("/ws", get(ws))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

async fn run(args: Args) -> Result<(), String> {
    let provisioner = Provisioner::from_config(&args.config).map_err(|e| e.to_string())?;
    // Whatever a killed earlier server left unfinished is finished or rolled back first.
    let report = provisioner.recover().await.map_err(|e| e.to_string())?;
    let recovered = report.completed.len() + report.rolled_back.len() + report.removed.len();
    if recovered > 0 {
        eprintln!("web: recovered {recovered} interrupted run(s)");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = App {
        provisioner,
        port: addr.port(),
    };
    println!("devvm web: listening on http://{addr}/");
    axum::serve(listener, router(app))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
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

    #[test]
    fn listens_on_loopback_only() {
        assert!(loopback_address("127.0.0.1:8080").is_ok());
        assert!(loopback_address("[::1]:0").is_ok());
        for bad in ["0.0.0.0:8080", "10.99.0.1:80", "[::]:8080"] {
            let e = loopback_address(bad).expect_err(bad);
            assert!(e.contains("non-loopback"), "{e}");
        }
        assert!(loopback_address("localhost").is_err());
    }

    #[test]
    fn only_our_host_and_origin() {
        let mut h = HeaderMap::new();
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
