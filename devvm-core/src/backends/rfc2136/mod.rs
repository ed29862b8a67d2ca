//! [`DnsUpdater`] on RFC 2136 dynamic updates signed with TSIG (RFC 8945), as served by
//! BIND 9 (`allow-update { key "..."; }`) and any other primary that speaks them.
//!
//! # Config (`[dns]`, `backend = "rfc2136"`)
//!
//! ```toml
//! [dns]
//! backend = "rfc2136"
//! server = "10.99.0.1:53"          # or "10.99.0.1" plus `port` (default 53)
//! zone = "lab.devvm.test"          # the forward zone; a VM is `<name>.<zone>`
//! reverse_zone = "0.99.10.in-addr.arpa"   # optional: default is the address's /24 (IPv6: /64)
//! key_file = "keys/devvm.tsig.key" # `tsig-keygen` output; relative to the config file
//! ttl = 300                        # seconds, default 300
//! timeout_secs = 5                 # per exchange with the server, default 5
//! ```
//!
//! See [`Rfc2136Config`]. The key file is BIND's own format, as `tsig-keygen` writes it:
//!
//! ```text
//! key "devvm" {
//!     algorithm hmac-sha256;
//!     secret "base64...";
//! };
//! ```
//!
//! `hmac-sha256`, `hmac-sha384` and `hmac-sha512` are supported. The secret never appears
//! in `Debug`, errors or logs, and errors about the file never quote it.
//!
//! # How records are published
//!
//! Every exchange is one DNS message over TCP (no retransmission, so an update is never
//! applied twice), TSIG-signed with the key, and every answer must carry a valid TSIG
//! signature of the same key: an unsigned or forged answer never counts as success.
//! Messages are built with `hickory-proto`'s types; nothing here writes wire format.
//!
//! [`publish`](DnsUpdater::publish) first asks the server for the current A (AAAA for
//! IPv6) of the name and the PTR of the address. A record pointing elsewhere is
//! [`ErrorKind::Conflict`] and nothing is sent. When both are already exactly ours, nothing
//! is sent either. Otherwise the missing A is added by an UPDATE whose prerequisite is
//! "this RRset does not exist" (RFC 2136 §2.4.3), so a record that appeared meanwhile makes
//! the server refuse it (`YXRRSET`, a conflict) instead of adding a second address; then
//! the missing PTR likewise in the reverse zone. If the PTR update fails, the A record just
//! added is deleted again, so both or neither are published.
//!
//! [`remove`](DnsUpdater::remove) deletes exactly `fqdn A ip` and `ip PTR fqdn.` (RFC 2136
//! §2.5.4, delete an RR by its data), so records that point elsewhere stay untouched and
//! absent records are no error.
//!
//! # Errors
//!
//! Each error names the zone it concerns.
//!
//! | server answer | [`ErrorKind`] |
//! |---|---|
//! | TSIG error `BADKEY`, `BADSIG`, `BADTIME`, or an answer whose TSIG does not verify (wrong key, wrong key name, unsigned answer) | `Unauthorized` |
//! | `REFUSED` (the update policy does not allow the key, or the server does not serve the zone) | `Unauthorized` |
//! | `NOTAUTH` in a correctly signed answer (the server is not authoritative for the zone) | `InvalidInput` |
//! | `NOTZONE` (a name outside the zone) | `InvalidInput` |
//! | `YXRRSET`, `YXDOMAIN`, `NXRRSET`, `NXDOMAIN` to an update (a prerequisite failed) | `Conflict` |
//! | `SERVFAIL`, connection refused or reset | `Unavailable` (retryable) |
//! | no answer within `timeout_secs` | `Timeout` (retryable) |
//! | `FORMERR`, `NOTIMP`, a malformed answer | `Backend` |
//!
//! A key file that is missing or cannot be parsed is `InvalidInput` naming the file.
//!
//! [`ErrorKind`]: crate::ErrorKind
//! [`ErrorKind::Conflict`]: crate::ErrorKind::Conflict

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::StreamExt;
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::{DnsStreamHandle, NetError};
use hickory_proto::op::UpdateMessage;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode, SerialMessage};
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as ProtoTsigAlgorithm;
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Label, Name, RData, Record, RecordType, TSigVerifier, TSigner};
use secrecy::{ExposeSecret, SecretSlice};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::traits::DnsUpdater;
use crate::types::{DnsRecord, Undone, VmName};

const BACKEND: &str = "rfc2136";

/// The TSIG fudge: how far the server's clock may be from ours, in seconds (RFC 8945
/// recommends 300).
const FUDGE_SECS: u16 = 300;

/// The default TTL of published records, in seconds.
pub const DEFAULT_TTL: u32 = 300;
/// The default time allowed for one exchange with the server, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 5;
/// The default DNS port.
pub const DEFAULT_PORT: u16 = 53;

fn default_ttl() -> u32 {
    DEFAULT_TTL
}

fn default_timeout_secs() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

/// The `[dns]` section for `backend = "rfc2136"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rfc2136Config {
    /// The primary server: `"ip:port"` (`"[::1]:53"` for IPv6), or an address alone with
    /// the port in [`port`](Self::port).
    pub server: String,
    /// The port, when `server` is an address alone. Default 53.
    #[serde(default)]
    pub port: Option<u16>,
    /// The forward zone (`lab.devvm.test`); a VM's name is `<vm>.<zone>`.
    pub zone: String,
    /// The reverse zone holding the PTR records (`0.99.10.in-addr.arpa`). When absent it
    /// is derived from each address: its /24 for IPv4 (`10.99.0.7` →
    /// `0.99.10.in-addr.arpa`), its /64 for IPv6.
    #[serde(default)]
    pub reverse_zone: Option<String>,
    /// The TSIG key in BIND's `key "name" { algorithm ...; secret "..."; };` format, as
    /// `tsig-keygen` writes it. Relative paths are relative to the config file.
    pub key_file: PathBuf,
    /// TTL of the published records, in seconds. Default 300.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Time allowed for one exchange with the server (connect, send, answer), in seconds.
    /// Default 5.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

impl Rfc2136Config {
    /// The server's socket address, from `server` and `port`.
    pub fn server_addr(&self) -> Result<SocketAddr> {
        let text = self.server.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return match self.port {
                Some(port) if port != addr.port() => Err(Rfc2136Error::PortClash {
                    server: text.to_owned(),
                    named: addr.port(),
                    port,
                }
                .into()),
                _ => Ok(addr),
            };
        }
        let bare = text.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => Ok(SocketAddr::new(ip, self.port.unwrap_or(DEFAULT_PORT))),
            Err(_) => Err(Rfc2136Error::ServerNotIp(text.to_owned()).into()),
        }
    }
}

mod error;
mod key;
mod message;

use error::Rfc2136Error;
use key::*;
pub use key::{TsigAlgorithm, TsigKey};
use message::*;

fn net_error(source: NetError, server: SocketAddr, zone: &str, what: &str) -> Error {
    let (what, zone) = (what.to_owned(), zone.to_owned());
    let timed_out = match &source {
        NetError::Timeout => true,
        NetError::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    };
    if timed_out {
        Rfc2136Error::NoAnswer {
            what,
            server,
            zone,
            source,
        }
    } else if matches!(source, NetError::Proto(_)) {
        Rfc2136Error::BadExchange {
            what,
            server,
            zone,
            source,
        }
    } else {
        Rfc2136Error::Unreachable {
            what,
            server,
            zone,
            source,
        }
    }
    .into()
}

/// [`DnsUpdater`] that publishes A/AAAA and PTR records with TSIG-signed RFC 2136 updates.
///
/// Build it with [`Rfc2136Dns::from_config`] or [`Rfc2136Dns::new`]. `Debug` shows the
/// server, zones and key name, never the secret.
#[derive(Clone)]
pub struct Rfc2136Dns {
    server: SocketAddr,
    zone: Name,
    zone_text: String,
    reverse_zone: Option<Name>,
    key: TsigKey,
    ttl: u32,
    timeout: Duration,
}

impl fmt::Debug for Rfc2136Dns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rfc2136Dns")
            .field("server", &self.server)
            .field("zone", &self.zone_text)
            .field("reverse_zone", &self.reverse_zone.as_ref().map(without_dot))
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Rfc2136Dns {
    /// An updater for the forward `zone` on the primary at `server`, signing with `key`.
    /// The reverse zone is derived from each address (see
    /// [`with_reverse_zone`](Self::with_reverse_zone)); TTL 300 s, timeout 5 s.
    pub fn new(server: SocketAddr, zone: &str, key: TsigKey) -> Result<Self> {
        let zone = parse_zone(zone, "zone")?;
        Ok(Rfc2136Dns {
            server,
            zone_text: without_dot(&zone),
            zone,
            reverse_zone: None,
            key,
            ttl: DEFAULT_TTL,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        })
    }

    /// Puts every PTR record into `zone` (`0.99.10.in-addr.arpa`). Publishing an address
    /// outside it is then [`ErrorKind::InvalidInput`]. Without it, an address's PTR goes
    /// to its /24 (IPv4) or /64 (IPv6) reverse zone.
    ///
    /// [`ErrorKind::InvalidInput`]: crate::ErrorKind::InvalidInput
    pub fn with_reverse_zone(mut self, zone: &str) -> Result<Self> {
        self.reverse_zone = Some(parse_zone(zone, "reverse_zone")?);
        Ok(self)
    }

    /// The TTL of published records, in seconds (at most 2147483647).
    pub fn with_ttl(mut self, ttl: u32) -> Result<Self> {
        if ttl > i32::MAX as u32 {
            return Err(Rfc2136Error::TtlTooLarge(ttl).into());
        }
        self.ttl = ttl;
        Ok(self)
    }

    /// The time allowed for one exchange with the server (connect, send and answer).
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(Rfc2136Error::ZeroTimeout.into());
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// An updater from its config section; a relative `key_file` is resolved against
    /// `base_dir` (the config file's directory). Reads the key file now.
    pub fn from_config(config: &Rfc2136Config, base_dir: &Path) -> Result<Self> {
        let server = config.server_addr()?;
        let key = TsigKey::from_file(&base_dir.join(&config.key_file))?;
        let mut dns = Rfc2136Dns::new(server, &config.zone, key)?
            .with_ttl(config.ttl)?
            .with_timeout(Duration::from_secs(config.timeout_secs))?;
        if let Some(reverse) = &config.reverse_zone {
            dns = dns.with_reverse_zone(reverse)?;
        }
        Ok(dns)
    }

    /// The server updates are sent to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The forward zone, without the trailing dot.
    pub fn zone(&self) -> &str {
        &self.zone_text
    }

    /// The name of the TSIG key in use.
    pub fn key_name(&self) -> String {
        self.key.name()
    }

    fn fqdn_name(&self, vm: &VmName) -> Result<Name> {
        Label::from_ascii(vm.as_str())
            .and_then(|label| Name::from_labels([label]))
            .and_then(|name| name.append_domain(&self.zone))
            .map_err(|source| {
                Rfc2136Error::NameOutsideZone {
                    vm: vm.clone(),
                    zone: self.zone_text.clone(),
                    source,
                }
                .into()
            })
    }

    /// The reverse zone that holds the PTR of `ip`.
    fn reverse_zone_of(&self, ip: IpAddr) -> Result<Name> {
        match &self.reverse_zone {
            None => Ok(default_reverse_zone(ip)),
            Some(zone) if zone.zone_of(&reverse_name(ip)) => Ok(zone.clone()),
            Some(zone) => Err(Rfc2136Error::OutsideReverseZone {
                ip,
                zone: without_dot(zone),
            }
            .into()),
        }
    }

    /// Sends `message` signed with the key and returns the checked answer.
    async fn exchange(
        &self,
        mut message: Message,
        ok_codes: &[ResponseCode],
        zone: &Name,
        what: &str,
    ) -> Result<Message> {
        let zone = without_dot(zone);
        let is_update = message.metadata.op_code == OpCode::Update;
        let verifier = message
            .finalize(&self.key.signer, seconds_now())
            .map_err(|source| Rfc2136Error::Sign {
                what: what.to_owned(),
                source,
            })?;
        let bytes = message.to_vec().map_err(|source| Rfc2136Error::Encode {
            what: what.to_owned(),
            source,
        })?;
        let id = message.metadata.id;
        let server = self.server;
        let timeout = self.timeout;
        let send = async move {
            let (connect, mut handle) =
                TcpClientStream::new(server, None, Some(timeout), TokioRuntimeProvider::new());
            let mut stream = connect.await?;
            handle.send(SerialMessage::new(bytes, server))?;
            loop {
                let Some(answer) = stream.next().await else {
                    return Err(NetError::from(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server closed the connection without answering",
                    )));
                };
                let (answer, _) = answer?.into_parts();
                // Only an answer to this message counts; anything else is ignored.
                match Message::from_vec(&answer) {
                    Ok(m)
                        if m.metadata.id == id
                            && m.metadata.message_type == MessageType::Response =>
                    {
                        return Ok(answer);
                    }
                    _ => continue,
                }
            }
        };
        let answer = match tokio::time::timeout(timeout, send).await {
            Err(_) => return Err(net_error(NetError::Timeout, server, &zone, what)),
            Ok(Err(e)) => return Err(net_error(e, server, &zone, what)),
            Ok(Ok(answer)) => answer,
        };
        check_answer(&answer, verifier, ok_codes, is_update, &zone, what)
    }

    /// Sends an UPDATE to `zone`.
    async fn update(&self, zone: &Name, message: Message, what: &str) -> Result<()> {
        self.exchange(message, &[ResponseCode::NoError], zone, what)
            .await
            .map(|_| ())
    }

    /// Queries `name`/`rtype` (in `zone`, for errors) and returns the answers' data.
    async fn query(&self, name: &Name, rtype: RecordType, zone: &Name) -> Result<Vec<RData>> {
        let what = format!("query {} {rtype}", without_dot(name));
        let answer = self
            .exchange(
                query_message(name, rtype),
                &[ResponseCode::NoError, ResponseCode::NXDomain],
                zone,
                &what,
            )
            .await?;
        Ok(answer
            .answers
            .into_iter()
            .filter(|r| r.name == *name && r.record_type() == rtype)
            .map(|r| r.data)
            .collect())
    }

    async fn addresses(&self, name: &Name, rtype: RecordType) -> Result<Vec<IpAddr>> {
        Ok(self
            .query(name, rtype, &self.zone)
            .await?
            .into_iter()
            .filter_map(|d| match d {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect())
    }

    async fn ptr_names(&self, ip: IpAddr, zone: &Name) -> Result<Vec<Name>> {
        Ok(self
            .query(&reverse_name(ip), RecordType::PTR, zone)
            .await?
            .into_iter()
            .filter_map(|d| match d {
                RData::PTR(p) => Some(p.0),
                _ => None,
            })
            .collect())
    }
}

#[async_trait]
impl DnsUpdater for Rfc2136Dns {
    fn backend(&self) -> &str {
        BACKEND
    }

    fn fqdn(&self, vm: &VmName) -> String {
        format!("{vm}.{}", self.zone_text)
    }

    async fn publish(&self, vm: &VmName, ip: IpAddr) -> Result<DnsRecord> {
        let fqdn_text = self.fqdn(vm);
        let fqdn = self.fqdn_name(vm)?;
        let reverse_zone = self.reverse_zone_of(ip)?;
        let rtype = address_type(ip);

        let current = self.addresses(&fqdn, rtype).await?;
        if let Some(other) = current.iter().find(|a| **a != ip) {
            return Err(Rfc2136Error::AddressTaken {
                fqdn: fqdn_text,
                other: *other,
                zone: self.zone_text.clone(),
            }
            .into());
        }
        let ptrs = self.ptr_names(ip, &reverse_zone).await?;
        if let Some(other) = ptrs.iter().find(|n| **n != fqdn) {
            return Err(Rfc2136Error::PtrTaken {
                ip,
                other: without_dot(other),
                zone: without_dot(&reverse_zone),
            }
            .into());
        }

        let added_address = if current.is_empty() {
            let what = format!("add {fqdn_text} {rtype} {ip}");
            let record = address_record(fqdn.clone(), ip, self.ttl);
            self.update(&self.zone, add_if_absent_update(&self.zone, record), &what)
                .await?;
            true
        } else {
            false
        };

        if ptrs.is_empty() {
            let what = format!("add {ip} PTR {fqdn_text}");
            let record = ptr_record(reverse_name(ip), fqdn.clone(), self.ttl);
            let added = self
                .update(
                    &reverse_zone,
                    add_if_absent_update(&reverse_zone, record),
                    &what,
                )
                .await;
            if let Err(e) = added {
                if !added_address {
                    return Err(e);
                }
                // Both or neither: take back the address record this call added.
                let undo_what = format!("delete {fqdn_text} {rtype} {ip}");
                let record = address_record(fqdn, ip, 0);
                let undone = self
                    .update(
                        &self.zone,
                        delete_record_update(&self.zone, record),
                        &undo_what,
                    )
                    .await;
                return Err(match undone {
                    Ok(()) => e,
                    Err(undo) => {
                        tracing::warn!(backend = BACKEND, error = %undo, "could not take back {rtype} record after a failed PTR update");
                        Rfc2136Error::AddressLeft {
                            rtype,
                            fqdn: fqdn_text,
                            ip,
                            undo: Box::new(undo),
                            source: Box::new(e),
                        }
                        .into()
                    }
                });
            }
        }
        Ok(DnsRecord {
            fqdn: fqdn_text,
            ip,
        })
    }

    /// Deletes exactly the A/AAAA record `fqdn(vm) -> ip` and the PTR `ip -> fqdn(vm)`
    /// (each update names the record's data, so a record pointing elsewhere is never
    /// touched). What the name held before tells the outcome.
    async fn remove(&self, vm: &VmName, ip: IpAddr) -> Result<Undone> {
        let fqdn_text = self.fqdn(vm);
        let fqdn = self.fqdn_name(vm)?;
        let rtype = address_type(ip);
        let before = self.addresses(&fqdn, rtype).await?;
        let outcome = if before.contains(&ip) {
            Undone::Removed
        } else if let Some(other) = before.first() {
            Undone::foreign(format!("whoever published {fqdn_text} -> {other}"))
        } else {
            Undone::Absent
        };
        let what = format!("delete {fqdn_text} {rtype} {ip}");
        let record = address_record(fqdn.clone(), ip, 0);
        self.update(&self.zone, delete_record_update(&self.zone, record), &what)
            .await?;
        // An address outside the configured reverse zone never got a PTR from us.
        let Ok(reverse_zone) = self.reverse_zone_of(ip) else {
            return Ok(outcome);
        };
        let what = format!("delete {ip} PTR {fqdn_text}");
        let record = ptr_record(reverse_name(ip), fqdn, 0);
        self.update(
            &reverse_zone,
            delete_record_update(&reverse_zone, record),
            &what,
        )
        .await?;
        Ok(outcome)
    }

    async fn resolve(&self, vm: &VmName) -> Result<Vec<IpAddr>> {
        let fqdn = self.fqdn_name(vm)?;
        let mut all = self.addresses(&fqdn, RecordType::A).await?;
        all.extend(self.addresses(&fqdn, RecordType::AAAA).await?);
        Ok(all)
    }

    async fn reverse(&self, ip: IpAddr) -> Result<Vec<String>> {
        let zone = match &self.reverse_zone {
            Some(z) if z.zone_of(&reverse_name(ip)) => z.clone(),
            _ => default_reverse_zone(ip),
        };
        Ok(self
            .ptr_names(ip, &zone)
            .await?
            .iter()
            .map(without_dot)
            .collect())
    }
}

/// Registers this backend as `rfc2136` in the `[dns]` section.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    r.register_dns("rfc2136", |ctx| {
        let o: Rfc2136Config = ctx.options()?;
        Ok(std::sync::Arc::new(Rfc2136Dns::from_config(
            &o,
            ctx.base_dir,
        )?))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// Whether an error is the expected variant.
    type Is = fn(&Rfc2136Error) -> bool;

    const SECRET_256: &str = "UsTZMZQiB8pt9m4wPz4oGd1HJwS4GJ2RxDn3ZK+1ZKM=";
    const SECRET_384: &str = "7dPpL0ucpWzD4oZZjF/2yXGvHV9XUl1NbQ/Gn6jkTwr6lcZrpK1nUz4rHjDYlAFs";
    const SECRET_512: &str =
        "mV0O/1XRHNqXk1BC5I1pyGlz3mO3XLR66Y2hAqHq0Ur3RWYAaOoFdhyjIS5lNhtytOAWCu+yZLgLJSuQMXBBCw==";

    fn keyfile(name: &str, alg: &str, secret: &str) -> String {
        format!("key \"{name}\" {{\n\talgorithm {alg};\n\tsecret \"{secret}\";\n}};\n")
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn parses_tsig_keygen_output_for_all_three_algorithms() {
        for (alg, secret, expect, len) in [
            ("hmac-sha256", SECRET_256, TsigAlgorithm::HmacSha256, 32),
            ("hmac-sha384", SECRET_384, TsigAlgorithm::HmacSha384, 48),
            ("hmac-sha512", SECRET_512, TsigAlgorithm::HmacSha512, 64),
        ] {
            let key = TsigKey::parse_bind(&keyfile("devvm-lab", alg, secret)).unwrap();
            assert_eq!(key.name(), "devvm-lab");
            assert_eq!(key.algorithm(), expect);
            assert_eq!(key.signer.key().len(), len);
            assert_eq!(
                key.signer.signer_name(),
                &Name::from_ascii("devvm-lab.").unwrap()
            );
        }
    }

    #[test]
    fn parses_other_layouts_and_comments() {
        let text = format!(
            "# made by tsig-keygen\n/* block\n comment */ key devvm.example. {{ // the key\n\
             secret \"{SECRET_256}\" ; ALGORITHM \"HMAC-SHA256\";}} ;\n// end\n"
        );
        let key = TsigKey::parse_bind(&text).unwrap();
        assert_eq!(key.name(), "devvm.example");
        assert_eq!(key.algorithm(), TsigAlgorithm::HmacSha256);
    }

    #[test]
    fn malformed_key_files_are_invalid_input_and_never_quote_the_secret() {
        let good = keyfile("k", "hmac-sha256", SECRET_256);
        let cases = [
            String::new(),
            "# only a comment\n".to_owned(),
            good.replace("};\n", "}\n"),
            good.replace("algorithm hmac-sha256;", ""),
            good.replace(&format!("secret \"{SECRET_256}\";"), ""),
            good.replace("hmac-sha256", "hmac-md5"),
            good.replace("hmac-sha256", "hmac-sha256-128"),
            good.replace(SECRET_256, &format!("{SECRET_256}!!")),
            good.replace(SECRET_256, ""),
            good.replace(&format!("\"{SECRET_256}\";"), &format!("\"{SECRET_256};")),
            good.replace("\tsecret", &format!("\t{SECRET_256} secret")),
            format!("{good}{good}"),
            format!("zone \"x\" {{ }};\n{good}"),
            good.replace("key \"k\"", "key \"bad name with spaces\""),
            good.replace(
                "algorithm hmac-sha256;",
                "algorithm hmac-sha256; algorithm hmac-sha512;",
            ),
            "/* never closed".to_owned(),
        ];
        for text in cases {
            let err = TsigKey::parse_bind(&text).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{text:?}: {err}");
            let detail = err.detail::<Rfc2136Error>();
            assert!(detail.is_some(), "{text:?}: {err}");
            let shown = format!("{err} {err:?} {detail:?}");
            assert!(!shown.contains(SECRET_256), "secret leaked: {shown}");
            assert!(!shown.contains(&SECRET_256[..12]), "secret leaked: {shown}");
        }
    }

    #[test]
    fn key_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.key");
        let err = TsigKey::from_file(&missing).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::KeyFileRead { path, .. }) if path == &missing),
            "{err}"
        );
        assert!(err.to_string().contains("missing.key"), "{err}");

        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, format!("key \"k\" {{ secret \"{SECRET_256}\"; }};")).unwrap();
        let err = TsigKey::from_file(&bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains("bad.key"), "{err}");
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::KeyFile { path, why }) if path == &bad && why.contains("no algorithm")),
            "{err}"
        );
        assert!(!format!("{err:?}").contains(SECRET_256));
        assert!(!format!("{:?}", err.detail::<Rfc2136Error>()).contains(SECRET_256));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = TsigKey::parse_bind(&keyfile("devvm-lab", "hmac-sha256", SECRET_256)).unwrap();
        let dns = Rfc2136Dns::new(
            "10.99.0.1:53".parse().unwrap(),
            "lab.devvm.test",
            key.clone(),
        )
        .unwrap();
        for shown in [format!("{key:?}"), format!("{dns:?}"), format!("{dns:#?}")] {
            assert!(shown.contains("devvm-lab"), "{shown}");
            assert!(shown.contains("HmacSha256"), "{shown}");
            assert!(!shown.contains(SECRET_256), "{shown}");
            assert!(!shown.contains(&SECRET_256[..8]), "{shown}");
        }
    }

    #[test]
    fn config_server_forms_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("k.key"),
            keyfile("k", "hmac-sha512", SECRET_512),
        )
        .unwrap();
        let c: Rfc2136Config = toml::from_str(
            "server = \"10.99.0.1\"\nzone = \"Lab.Devvm.Test.\"\nkey_file = \"k.key\"\n",
        )
        .unwrap();
        assert_eq!(c.ttl, 300);
        assert_eq!(c.timeout_secs, 5);
        let dns = Rfc2136Dns::from_config(&c, dir.path()).unwrap();
        assert_eq!(dns.server(), "10.99.0.1:53".parse().unwrap());
        assert_eq!(dns.zone(), "lab.devvm.test");
        assert_eq!(dns.key_name(), "k");
        assert_eq!(
            dns.fqdn(&VmName::new("web-1").unwrap()),
            "web-1.lab.devvm.test"
        );

        let with_port = Rfc2136Config {
            port: Some(5353),
            ..c.clone()
        };
        assert_eq!(
            with_port.server_addr().unwrap(),
            "10.99.0.1:5353".parse().unwrap()
        );
        let v6 = Rfc2136Config {
            server: "[::1]:5300".into(),
            ..c.clone()
        };
        assert_eq!(v6.server_addr().unwrap(), "[::1]:5300".parse().unwrap());
        let clash = Rfc2136Config {
            server: "10.0.0.1:53".into(),
            port: Some(54),
            ..c.clone()
        };
        let err = clash.server_addr().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(
                err.detail(),
                Some(Rfc2136Error::PortClash {
                    named: 53,
                    port: 54,
                    ..
                })
            ),
            "{err}"
        );
        let host = Rfc2136Config {
            server: "ns1.example".into(),
            ..c.clone()
        };
        let err = host.server_addr().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::ServerNotIp(s)) if s == "ns1.example"),
            "{err}"
        );

        let unknown = toml::from_str::<Rfc2136Config>(
            "server = \"10.99.0.1\"\nzone = \"z\"\nkey_file = \"k\"\nsecret = \"x\"\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("secret"));

        let err = Rfc2136Dns::from_config(
            &Rfc2136Config {
                key_file: "nope.key".into(),
                ..c.clone()
            },
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::KeyFileRead { .. })),
            "{err}"
        );
        assert_eq!(err.backend_name(), Some("rfc2136"));
        assert!(err.to_string().contains("nope.key"));
        for bad_zone in ["", ".", "a..b", "bad zone"] {
            let err = Rfc2136Dns::from_config(
                &Rfc2136Config {
                    zone: bad_zone.into(),
                    ..c.clone()
                },
                dir.path(),
            )
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad_zone:?}");
            assert!(
                matches!(
                    err.detail(),
                    Some(Rfc2136Error::BadZone { what: "zone", .. })
                ),
                "{bad_zone:?}: {err}"
            );
        }
    }

    #[test]
    fn reverse_zones_are_derived_or_checked() {
        let ip: IpAddr = "10.99.0.7".parse().unwrap();
        assert_eq!(reverse_name(ip), name("7.0.99.10.in-addr.arpa."));
        assert_eq!(default_reverse_zone(ip), name("0.99.10.in-addr.arpa."));
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            default_reverse_zone(v6),
            name("0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.")
        );

        let key = TsigKey::parse_bind(&keyfile("k", "hmac-sha256", SECRET_256)).unwrap();
        let dns = Rfc2136Dns::new("127.0.0.1:53".parse().unwrap(), "lab.test", key)
            .unwrap()
            .with_reverse_zone("99.10.in-addr.arpa")
            .unwrap();
        assert_eq!(
            dns.reverse_zone_of(ip).unwrap(),
            name("99.10.in-addr.arpa.")
        );
        let outside: IpAddr = "10.98.0.7".parse().unwrap();
        let err = dns.reverse_zone_of(outside).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::OutsideReverseZone { ip, zone }) if *ip == outside && zone == "99.10.in-addr.arpa"),
            "{err}"
        );
    }

    #[test]
    fn the_add_update_has_zone_prerequisite_and_update_sections() {
        let zone = name("lab.devvm.test.");
        let fqdn = name("web-1.lab.devvm.test.");
        let ip: IpAddr = "10.99.0.7".parse().unwrap();
        let m = add_if_absent_update(&zone, address_record(fqdn.clone(), ip, 300));
        assert_eq!(m.metadata.op_code, OpCode::Update);
        assert!(!m.metadata.recursion_desired);
        // Zone section: one SOA/IN entry naming the zone.
        assert_eq!(m.zones().len(), 1);
        assert_eq!(m.zones()[0].name(), &zone);
        assert_eq!(m.zones()[0].query_type(), RecordType::SOA);
        assert_eq!(m.zones()[0].query_class(), DNSClass::IN);
        // Prerequisite: "RRset does not exist": NONE class, TTL 0, type A, no data.
        assert_eq!(m.prerequisites().len(), 1);
        let p = &m.prerequisites()[0];
        assert_eq!(p.name, fqdn);
        assert_eq!(p.dns_class, DNSClass::NONE);
        assert_eq!(p.ttl, 0);
        assert_eq!(p.record_type(), RecordType::A);
        assert_eq!(p.data, RData::Update0(RecordType::A));
        // Update: add the A record in class IN with the TTL.
        assert_eq!(m.updates().len(), 1);
        let u = &m.updates()[0];
        assert_eq!(u.name, fqdn);
        assert_eq!(u.dns_class, DNSClass::IN);
        assert_eq!(u.ttl, 300);
        assert_eq!(u.data, RData::A(A("10.99.0.7".parse().unwrap())));
        assert!(m.additionals().is_empty());
        // It encodes and decodes to the same sections.
        let back = Message::from_vec(&m.to_vec().unwrap()).unwrap();
        assert_eq!(back.prerequisites(), m.prerequisites());
        assert_eq!(back.updates(), m.updates());

        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let m = add_if_absent_update(&zone, address_record(fqdn.clone(), v6, 60));
        assert_eq!(m.prerequisites()[0].data, RData::Update0(RecordType::AAAA));
        assert_eq!(m.updates()[0].record_type(), RecordType::AAAA);
    }

    #[test]
    fn the_ptr_update_targets_the_reverse_zone() {
        let rzone = name("0.99.10.in-addr.arpa.");
        let ip: IpAddr = "10.99.0.7".parse().unwrap();
        let fqdn = name("web-1.lab.devvm.test.");
        let m = add_if_absent_update(&rzone, ptr_record(reverse_name(ip), fqdn.clone(), 300));
        assert_eq!(m.zones()[0].name(), &rzone);
        let p = &m.prerequisites()[0];
        assert_eq!(p.name, name("7.0.99.10.in-addr.arpa."));
        assert_eq!(p.dns_class, DNSClass::NONE);
        assert_eq!(p.data, RData::Update0(RecordType::PTR));
        let u = &m.updates()[0];
        assert_eq!(u.dns_class, DNSClass::IN);
        assert_eq!(u.data, RData::PTR(PTR(fqdn)));
    }

    #[test]
    fn the_delete_update_deletes_exactly_one_record() {
        let zone = name("lab.devvm.test.");
        let fqdn = name("web-1.lab.devvm.test.");
        let ip: IpAddr = "10.99.0.7".parse().unwrap();
        let m = delete_record_update(&zone, address_record(fqdn.clone(), ip, 300));
        assert_eq!(m.metadata.op_code, OpCode::Update);
        assert_eq!(m.zones()[0].name(), &zone);
        assert!(m.prerequisites().is_empty());
        assert_eq!(m.updates().len(), 1);
        let u = &m.updates()[0];
        assert_eq!(u.name, fqdn);
        assert_eq!(u.dns_class, DNSClass::NONE);
        assert_eq!(u.ttl, 0);
        assert_eq!(u.data, RData::A(A("10.99.0.7".parse().unwrap())));
    }

    #[test]
    fn signed_messages_verify_and_answers_are_checked() {
        let key = TsigKey::parse_bind(&keyfile("devvm-lab", "hmac-sha256", SECRET_256)).unwrap();
        let other = TsigKey::parse_bind(&keyfile("devvm-lab", "hmac-sha256", SECRET_512)).unwrap();
        let zone = name("lab.devvm.test.");
        let now = seconds_now();
        let answer_for = |signer: &TsigKey, code: ResponseCode| {
            let mut request = query_message(&zone, RecordType::SOA);
            let verifier = request.finalize(&key.signer, now).unwrap();
            let request_mac = request.signature().unwrap().data.mac.clone();
            let mut answer = Message::response(request.metadata.id, OpCode::Query);
            answer.metadata.response_code = code;
            answer.add_query(request.queries[0].clone());
            let unsigned = answer.to_vec().unwrap();
            let ctx = hickory_proto::rr::TSigResponseContext::new(
                answer.metadata.id,
                now,
                signer.signer.clone(),
                request_mac,
                None,
            );
            answer.set_signature(ctx.sign(&unsigned).unwrap());
            (answer.to_vec().unwrap(), verifier)
        };
        let ok = [ResponseCode::NoError];

        let (bytes, verifier) = answer_for(&key, ResponseCode::NoError);
        check_answer(&bytes, verifier, &ok, false, "z", "q").unwrap();

        // Signed with another secret: never a success.
        let (bytes, verifier) = answer_for(&other, ResponseCode::NoError);
        let err = check_answer(&bytes, verifier, &ok, false, "z", "q").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized);
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::Unsigned { .. })),
            "{err}"
        );

        // Unsigned: never a success.
        let (bytes, verifier) = answer_for(&key, ResponseCode::NoError);
        let mut unsigned = Message::from_vec(&bytes).unwrap();
        unsigned.take_signature();
        let err =
            check_answer(&unsigned.to_vec().unwrap(), verifier, &ok, false, "z", "q").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized);
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::Unsigned { .. })),
            "{err}"
        );

        let cases: [(ResponseCode, bool, ErrorKind, Is); 10] = [
            (ResponseCode::YXRRSet, true, ErrorKind::Conflict, |e| {
                matches!(
                    e,
                    Rfc2136Error::PrerequisiteFailed {
                        code: ResponseCode::YXRRSet,
                        ..
                    }
                )
            }),
            (ResponseCode::NXRRSet, true, ErrorKind::Conflict, |e| {
                matches!(
                    e,
                    Rfc2136Error::PrerequisiteFailed {
                        code: ResponseCode::NXRRSet,
                        ..
                    }
                )
            }),
            (ResponseCode::YXDomain, true, ErrorKind::Conflict, |e| {
                matches!(
                    e,
                    Rfc2136Error::PrerequisiteFailed {
                        code: ResponseCode::YXDomain,
                        ..
                    }
                )
            }),
            (ResponseCode::Refused, true, ErrorKind::Unauthorized, |e| {
                matches!(e, Rfc2136Error::UpdateRefused { .. })
            }),
            (ResponseCode::Refused, false, ErrorKind::Unauthorized, |e| {
                matches!(e, Rfc2136Error::QueryRefused { .. })
            }),
            (ResponseCode::NotAuth, true, ErrorKind::InvalidInput, |e| {
                matches!(e, Rfc2136Error::NotAuthoritative { .. })
            }),
            (ResponseCode::NotZone, true, ErrorKind::InvalidInput, |e| {
                matches!(e, Rfc2136Error::NotZone { .. })
            }),
            (ResponseCode::ServFail, true, ErrorKind::Unavailable, |e| {
                matches!(e, Rfc2136Error::ServFail { .. })
            }),
            (ResponseCode::FormErr, true, ErrorKind::Backend, |e| {
                matches!(
                    e,
                    Rfc2136Error::Rcode {
                        code: ResponseCode::FormErr,
                        ..
                    }
                )
            }),
            (ResponseCode::NXDomain, false, ErrorKind::Backend, |e| {
                matches!(
                    e,
                    Rfc2136Error::Rcode {
                        code: ResponseCode::NXDomain,
                        ..
                    }
                )
            }),
        ];
        for (code, update, kind, expected) in cases {
            let (bytes, verifier) = answer_for(&key, code);
            let err =
                check_answer(&bytes, verifier, &ok, update, "lab.devvm.test", "q").unwrap_err();
            assert_eq!(err.kind(), kind, "{code}: {err}");
            assert!(err.detail().is_some_and(expected), "{code}: {err}");
            // Each error names its zone for the reader.
            assert!(err.to_string().contains("lab.devvm.test"), "{err}");
        }
        // NOTAUTH in an answer that does not verify is a key problem.
        let (bytes, verifier) = answer_for(&other, ResponseCode::NotAuth);
        let err = check_answer(&bytes, verifier, &ok, true, "z", "q").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized);
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::KeyRejected { .. })),
            "{err}"
        );
    }

    #[test]
    fn an_address_left_behind_keeps_the_ptr_failures_kind_and_retryability() {
        let ptr_failure = |code| -> Error {
            Rfc2136Error::Rcode {
                what: "add 10.0.0.7 PTR web-1.lab.test".into(),
                zone: "0.0.10.in-addr.arpa".into(),
                code,
            }
            .into()
        };
        let undo: Error = Rfc2136Error::Unreachable {
            what: "delete web-1.lab.test A 10.0.0.7".into(),
            server: "127.0.0.1:53".parse().unwrap(),
            zone: "lab.test".into(),
            source: NetError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        }
        .into();
        for (first, kind, retryable) in [
            (
                ptr_failure(ResponseCode::FormErr),
                ErrorKind::Backend,
                false,
            ),
            (
                Rfc2136Error::ServFail {
                    what: "q".into(),
                    zone: "z".into(),
                }
                .into(),
                ErrorKind::Unavailable,
                true,
            ),
            (
                ptr_failure(ResponseCode::NotImp).with_retryable(true),
                ErrorKind::Backend,
                true,
            ),
        ] {
            let first_message = first.message().to_owned();
            let e: Error = Rfc2136Error::AddressLeft {
                rtype: RecordType::A,
                fqdn: "web-1.lab.test".into(),
                ip: "10.0.0.7".parse().unwrap(),
                undo: Box::new(Error::new(undo.kind(), undo.message())),
                source: Box::new(first),
            }
            .into();
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(e.is_retryable(), retryable, "{e}");
            assert_eq!(e.backend_name(), Some("rfc2136"));
            assert!(e.message().starts_with(&first_message), "{e}");
            assert!(
                e.message().contains(
                    "the A record web-1.lab.test -> 10.0.0.7 just added is still published"
                ),
                "{e}"
            );
            // The chain goes on with the PTR update's failure.
            assert_eq!(
                std::error::Error::source(&e).map(ToString::to_string),
                Some(first_message)
            );
        }
    }

    #[tokio::test]
    async fn a_server_that_is_not_there_is_unavailable_and_retryable() {
        // Find a local port with no listener.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let key = TsigKey::parse_bind(&keyfile("k", "hmac-sha256", SECRET_256)).unwrap();
        let dns = Rfc2136Dns::new(SocketAddr::from(([127, 0, 0, 1], port)), "lab.test", key)
            .unwrap()
            .with_timeout(Duration::from_secs(2))
            .unwrap();
        let vm = VmName::new("web-1").unwrap();
        let started = std::time::Instant::now();
        let err = dns.resolve(&vm).await.unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
            "{err}"
        );
        assert!(
            matches!(
                err.detail(),
                Some(Rfc2136Error::Unreachable { .. } | Rfc2136Error::NoAnswer { .. })
            ),
            "{err}"
        );
        assert!(err.is_retryable());
        assert_eq!(err.backend_name(), Some("rfc2136"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // A listener that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let key = TsigKey::parse_bind(&keyfile("k", "hmac-sha256", SECRET_256)).unwrap();
        let dns = Rfc2136Dns::new(addr, "lab.test", key)
            .unwrap()
            .with_timeout(Duration::from_millis(300))
            .unwrap();
        let err = dns
            .publish(&VmName::new("web-1").unwrap(), "10.0.0.7".parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert!(err.is_retryable());
        assert!(
            matches!(err.detail(), Some(Rfc2136Error::NoAnswer { zone, .. }) if zone == "lab.test"),
            "{err}"
        );
        hold.abort();
    }
}
