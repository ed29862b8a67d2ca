//! Who is asking, what they may do, and what was done: signed session cookies, the
//! principal of a request, the audit log, and the limits on connections and runs.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use devvm_core::{Error, ErrorInfo, UserName};
use ring::hmac;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The name of the session cookie.
pub(crate) const COOKIE: &str = "devvm_session";

/// How a request's user was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Via {
    /// No sign-in configured: a loopback-only server, whoever reaches it may act for anyone.
    Loopback,
    /// A session cookie issued after an LDAP bind with the user's own password.
    Ldap,
    /// The trusted header of an authenticating reverse proxy.
    Proxy,
}

/// Who is asking.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    /// `None` on a loopback server without sign-in.
    pub(crate) user: Option<UserName>,
    /// A member of the admin group (or the loopback server's local user).
    pub(crate) admin: bool,
    pub(crate) via: Via,
    pub(crate) peer: IpAddr,
}

impl Principal {
    /// Whether this principal may act on what `owner` owns (or provision for `owner`).
    pub(crate) fn may_act_for(&self, owner: &UserName) -> bool {
        self.admin || self.user.as_ref() == Some(owner)
    }

    /// The name the audit log and messages use.
    pub(crate) fn who(&self) -> &str {
        self.user.as_ref().map_or("local", |u| u.as_str())
    }

    /// Whose per-user run cap a run for `owner` counts against: the signed-in user's
    /// (an admin's runs for others are the admin's), or on a server without sign-in, the
    /// owner's.
    pub(crate) fn counted_as<'a>(&'a self, owner: &'a UserName) -> &'a str {
        self.user.as_ref().unwrap_or(owner).as_str()
    }

    /// [`counted_as`](Self::counted_as) for a run on `vm` (the principal's own name when
    /// the VM is not listed).
    pub(crate) fn counted_as_owner_of<'a>(&'a self, vm: Option<&'a devvm_core::Vm>) -> &'a str {
        match (&self.user, vm) {
            (None, Some(vm)) => vm.owner.as_str(),
            _ => self.who(),
        }
    }

    /// Refuses acting for `owner` with a message saying why.
    pub(crate) fn check_may_act_for(&self, owner: &UserName, what: &str) -> devvm_core::Result<()> {
        if self.may_act_for(owner) {
            return Ok(());
        }
        Err(Error::unauthorized(format!(
            "{what} belongs to {owner}; you are signed in as {}, and only an admin may act for \
             another user",
            self.who()
        )))
    }
}

/// Signs and checks session tokens with an HMAC-SHA256 key that lives in memory only (a
/// restart signs everyone out).
pub(crate) struct SessionKey {
    key: hmac::Key,
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// A fresh random key.
    pub(crate) fn random() -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| "cannot make a session key: no system randomness".to_owned())?;
        Ok(SessionKey { key })
    }

    /// A token naming session `id` of `user`, valid until `expires`.
    pub(crate) fn issue(&self, id: &str, user: &UserName, expires: OffsetDateTime) -> String {
        let payload = format!("v1|{id}|{}|{}", user.as_str(), expires.unix_timestamp());
        let tag = hmac::sign(&self.key, payload.as_bytes());
        format!("{}.{}", B64.encode(payload), B64.encode(tag.as_ref()))
    }

    /// The session id and user of a token this key signed that has not expired.
    pub(crate) fn verify(&self, token: &str, now: OffsetDateTime) -> Option<(String, UserName)> {
        let (payload, tag) = token.split_once('.')?;
        let payload = B64.decode(payload).ok()?;
        let tag = B64.decode(tag).ok()?;
        hmac::verify(&self.key, &payload, &tag).ok()?;
        let payload = String::from_utf8(payload).ok()?;
        let mut parts = payload.split('|');
        let (v, id, user, exp) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if v != "v1" || parts.next().is_some() {
            return None;
        }
        let exp: i64 = exp.parse().ok()?;
        if now.unix_timestamp() >= exp {
            return None;
        }
        Some((id.to_owned(), UserName::new(user).ok()?))
    }
}

/// How often a live session's user is looked up again (still in the owners' group, still
/// an admin or not).
pub(crate) const RECHECK: Duration = Duration::from_secs(300);

/// One signed-in session, kept on the server: signing out ends it at once, and the
/// user's groups are checked again every [`RECHECK`].
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub(crate) user: UserName,
    pub(crate) admin: bool,
    pub(crate) checked: std::time::Instant,
    expires: OffsetDateTime,
}

/// The live sessions and the key their tokens are signed with.
#[derive(Debug)]
pub(crate) struct Sessions {
    key: SessionKey,
    live: Mutex<HashMap<String, Live>>,
    rng: ring::rand::SystemRandom,
}

impl Sessions {
    pub(crate) fn new() -> Result<Self, String> {
        Ok(Sessions {
            key: SessionKey::random()?,
            live: Mutex::new(HashMap::new()),
            rng: ring::rand::SystemRandom::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a session of `user` for `ttl` and returns its token.
    pub(crate) fn start(
        &self,
        user: &UserName,
        admin: bool,
        ttl: Duration,
    ) -> Result<String, String> {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 18];
        self.rng
            .fill(&mut id)
            .map_err(|_| "no system randomness".to_owned())?;
        let id = B64.encode(id);
        let now = OffsetDateTime::now_utc();
        let expires = now + ttl;
        let mut live = self.lock();
        live.retain(|_, s| s.expires > now);
        live.insert(
            id.clone(),
            Live {
                user: user.clone(),
                admin,
                checked: std::time::Instant::now(),
                expires,
            },
        );
        Ok(self.key.issue(&id, user, expires))
    }

    /// The live session of `token`: signed by us, unexpired, not signed out.
    pub(crate) fn get(&self, token: &str) -> Option<(String, Live)> {
        let (id, user) = self.key.verify(token, OffsetDateTime::now_utc())?;
        let live = self.lock().get(&id).cloned()?;
        (live.user == user).then_some((id, live))
    }

    /// Records a fresh check of session `id`'s user.
    pub(crate) fn checked(&self, id: &str, admin: bool) {
        if let Some(s) = self.lock().get_mut(id) {
            s.admin = admin;
            s.checked = std::time::Instant::now();
        }
    }

    /// Ends session `id` (sign-out, or a user who may no longer sign in).
    pub(crate) fn end(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// The cookie's name: under TLS with the `__Host-` prefix, which browsers only accept
/// from this very origin over HTTPS with `Path=/` (no sibling domain can plant one).
pub(crate) fn cookie_name(secure: bool) -> &'static str {
    if secure {
        "__Host-devvm_session"
    } else {
        COOKIE
    }
}

/// The one session token in the request's `Cookie` headers; `None` when there is none,
/// or more than one (a planted cookie beside ours is refused, not guessed between).
pub(crate) fn session_cookie<'a>(
    cookie_headers: impl Iterator<Item = &'a str>,
    secure: bool,
) -> Option<&'a str> {
    let name = cookie_name(secure);
    let mut found = cookie_headers
        .flat_map(|h| h.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .map(|(_, value)| value);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, and Secure with the `__Host-` prefix
/// when served over TLS.
pub(crate) fn set_cookie(token: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        cookie_name(secure),
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// One line of the audit log.
#[derive(Debug, Serialize)]
pub(crate) struct AuditEntry<'a> {
    /// Who acted (`local` on a loopback server without sign-in).
    pub(crate) who: &'a str,
    pub(crate) via: Option<Via>,
    pub(crate) peer: IpAddr,
    /// `sign_in`, `sign_out`, `provision`, `deprovision`, `migrate`.
    pub(crate) action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vm: Option<&'a str>,
    /// The user a provision is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) for_user: Option<&'a str>,
    /// `ok`, `refused` (not allowed or over a limit), `failed` (the run failed), or
    /// `started` (the browser left; the run went on).
    pub(crate) result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<ErrorInfo>,
}

/// The audit log: JSON lines appended to a file, one per action, with the time.
pub(crate) struct Audit {
    file: Mutex<std::fs::File>,
}

impl Audit {
    /// Appends to `path` (created 0600 if missing).
    pub(crate) fn open(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("cannot open the audit log {}: {e}", path.display()))?;
        Ok(Audit {
            file: Mutex::new(file),
        })
    }

    /// Writes one entry. A log that cannot be written is reported on stderr; the action
    /// itself has happened already.
    pub(crate) fn record(&self, entry: &AuditEntry<'_>) {
        let at = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut line = match serde_json::to_value(entry) {
            Ok(v) => v,
            Err(_) => return,
        };
        line["at"] = serde_json::Value::String(at);
        let mut text = line.to_string();
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.flush()) {
            eprintln!("web: cannot write the audit log: {e}");
        }
    }
}

/// Caps on connections and runs, and the time limits of a connection.
#[derive(Debug)]
pub(crate) struct Limits {
    connections: Arc<Semaphore>,
    pub(crate) max_connections: usize,
    pub(crate) max_runs: usize,
    pub(crate) max_runs_per_user: usize,
    /// How long a new websocket may take to send its command.
    pub(crate) first_message: Duration,
    /// How long one send to the browser may take before the connection is dropped.
    pub(crate) idle: Duration,
    /// The largest message (and frame) a browser may send.
    pub(crate) message_bytes: usize,
    runs: Mutex<RunCounts>,
}

#[derive(Debug, Default)]
struct RunCounts {
    total: usize,
    per_user: HashMap<String, usize>,
}

impl Limits {
    pub(crate) fn new(
        max_connections: usize,
        max_runs: usize,
        max_runs_per_user: usize,
        first_message: Duration,
        idle: Duration,
    ) -> Self {
        Limits {
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            max_runs,
            max_runs_per_user,
            first_message,
            idle,
            message_bytes: 64 * 1024,
            runs: Mutex::new(RunCounts::default()),
        }
    }

    /// How many websockets are open, and how many runs go on.
    pub(crate) fn in_use(&self) -> (usize, usize) {
        let open = self.max_connections - self.connections.available_permits();
        let runs = self
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total;
        (open, runs)
    }

    /// A connection slot, or `None` when `max_connections` are open.
    pub(crate) fn connection(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.connections).try_acquire_owned().ok()
    }

    /// A run slot for `who`, held until the run ends; over a cap is
    /// [`ErrorKind::Exhausted`](devvm_core::ErrorKind::Exhausted) saying which.
    pub(crate) fn run(self: &Arc<Self>, who: &str) -> devvm_core::Result<RunSlot> {
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if runs.total >= self.max_runs {
            return Err(Error::new(
                devvm_core::ErrorKind::Exhausted,
                format!(
                    "the server runs {} operations already (its limit); try again when one ends",
                    runs.total
                ),
            ));
        }
        let mine = runs.per_user.entry(who.to_owned()).or_default();
        if *mine >= self.max_runs_per_user {
            return Err(Error::new(
                devvm_core::ErrorKind::Exhausted,
                format!(
                    "{who} has {mine} operations going already (the limit per user is {}); try \
                     again when one ends",
                    self.max_runs_per_user
                ),
            ));
        }
        *mine += 1;
        runs.total += 1;
        Ok(RunSlot {
            limits: Arc::clone(self),
            who: who.to_owned(),
        })
    }
}

/// A run counted against its user's and the server's caps until dropped.
#[derive(Debug)]
pub(crate) struct RunSlot {
    limits: Arc<Limits>,
    who: String,
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        let mut runs = self
            .limits
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        runs.total = runs.total.saturating_sub(1);
        if let Some(n) = runs.per_user.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                runs.per_user.remove(&self.who);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserName {
        UserName::new(s).unwrap()
    }

    #[test]
    fn tokens_verify_only_unchanged_unexpired_and_with_our_key() {
        let key = SessionKey::random().unwrap();
        let now = OffsetDateTime::now_utc();
        let later = now + time::Duration::hours(1);
        let t = key.issue("id1", &user("alice"), later);
        assert_eq!(key.verify(&t, now), Some(("id1".to_owned(), user("alice"))));
        assert_eq!(key.verify(&t, later), None, "expired");
        let other = SessionKey::random().unwrap();
        assert_eq!(other.verify(&t, now), None, "another key");
        // Changing the payload (alice -> carol) breaks the tag.
        let (_, tag) = t.split_once('.').unwrap();
        let forged = format!(
            "{}.{tag}",
            B64.encode(format!("v1|id1|carol|{}", later.unix_timestamp()))
        );
        assert_eq!(key.verify(&forged, now), None);
        for junk in ["", ".", "a.b", "not base64!.x"] {
            assert_eq!(key.verify(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn signing_out_ends_a_session_at_once() {
        let sessions = Sessions::new().unwrap();
        let t = sessions
            .start(&user("carol"), true, Duration::from_secs(3600))
            .unwrap();
        let (id, live) = sessions.get(&t).expect("live");
        assert!(live.admin);
        sessions.checked(&id, false);
        assert!(
            !sessions.get(&t).unwrap().1.admin,
            "a re-check updates the admin flag"
        );
        sessions.end(&id);
        assert!(
            sessions.get(&t).is_none(),
            "the token is dead once signed out"
        );
        let other = Sessions::new().unwrap();
        assert!(other.get(&t).is_none());
    }

    #[test]
    fn cookies_are_found_and_set_strictly() {
        let one = |h: &'static str| session_cookie(std::iter::once(h), false);
        assert_eq!(one("a=1; devvm_session=tok.en; b=2"), Some("tok.en"));
        assert_eq!(one("devvm_sessionx=1"), None);
        assert_eq!(
            one("devvm_session=a; devvm_session=b"),
            None,
            "two: refused"
        );
        assert_eq!(
            session_cookie(["devvm_session=a", "devvm_session=b"].into_iter(), false),
            None
        );
        assert_eq!(
            session_cookie(std::iter::once("__Host-devvm_session=t"), true),
            Some("t")
        );
        assert_eq!(
            session_cookie(std::iter::once("devvm_session=t"), true),
            None
        );
        let c = set_cookie("t", Duration::from_secs(60), true);
        for part in [
            "__Host-devvm_session=t",
            "HttpOnly",
            "SameSite=Strict",
            "Max-Age=60",
            "Secure",
            "Path=/",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!set_cookie("t", Duration::from_secs(60), false).contains("Secure"));
    }

    #[test]
    fn run_caps_per_user_and_in_total() {
        let limits = Arc::new(Limits::new(
            4,
            3,
            2,
            Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        let a1 = limits.run("alice").unwrap();
        let _a2 = limits.run("alice").unwrap();
        let e = limits.run("alice").expect_err("third of alice's");
        assert_eq!(e.kind(), devvm_core::ErrorKind::Exhausted);
        assert!(e.to_string().contains("per user"), "{e}");
        let _b1 = limits.run("bob").unwrap();
        let e = limits.run("carol").expect_err("server full");
        assert!(e.to_string().contains("its limit"), "{e}");
        drop(a1);
        let _c1 = limits.run("carol").expect("a slot freed");
        let permits: Vec<_> = (0..4).map(|_| limits.connection()).collect();
        assert!(permits.iter().all(Option::is_some));
        assert!(limits.connection().is_none());
        assert_eq!(limits.in_use(), (4, 3));
    }

    #[test]
    fn only_admins_act_for_others() {
        let p = Principal {
            user: Some(user("bob")),
            admin: false,
            via: Via::Ldap,
            peer: [127, 0, 0, 1].into(),
        };
        assert!(p.may_act_for(&user("bob")));
        let e = p
            .check_may_act_for(&user("alice"), "vm alice-1")
            .expect_err("not bob's");
        assert_eq!(e.kind(), devvm_core::ErrorKind::Unauthorized);
        assert!(e.to_string().contains("belongs to alice"), "{e}");
        assert_eq!(p.counted_as(&user("alice")), "bob");
        let admin = Principal { admin: true, ..p };
        assert!(admin.may_act_for(&user("alice")));
        let local = Principal {
            user: None,
            admin: true,
            via: Via::Loopback,
            peer: [127, 0, 0, 1].into(),
        };
        assert_eq!(
            local.counted_as(&user("alice")),
            "alice",
            "no sign-in: the owner's cap"
        );
    }
}
