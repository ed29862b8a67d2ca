//! What can go wrong in the RFC 2136 updater, as one private enum; `?` turns it into the
//! public [`Error`] with the [`ErrorKind`] each variant names.
//!
//! No variant holds key material: errors about a key or its file carry its name, its
//! algorithm, the file's path and the parser's line numbers, never the secret or the text.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use hickory_net::NetError;
use hickory_proto::ProtoError;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::tsig::TsigError;
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::DecodeError;

use super::TsigAlgorithm;
use crate::error::{BackendError, Error, ErrorKind};
use crate::types::VmName;

/// A failure of the RFC 2136 updater.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Rfc2136Error {
    #[error("server {server:?} names port {named} but port is {port}")]
    PortClash {
        server: String,
        named: u16,
        port: u16,
    },
    #[error("server {0:?} is not an IP address or ip:port")]
    ServerNotIp(String),
    #[error("{what} {text:?} {why}")]
    BadZone {
        what: &'static str,
        text: String,
        why: &'static str,
    },
    #[error("ttl {0} is above 2147483647")]
    TtlTooLarge(u32),
    #[error("timeout must be above zero")]
    ZeroTimeout,

    #[error("TSIG algorithm {0:?} is not supported (use hmac-sha256, hmac-sha384 or hmac-sha512)")]
    UnknownAlgorithm(String),
    #[error("TSIG key name {name:?} {why}")]
    BadKeyName { name: String, why: &'static str },
    #[error("TSIG key {0}: the secret is empty")]
    EmptySecret(Name),
    #[error("TSIG key {key}: algorithm {algorithm} is not supported")]
    SignerAlgorithm { key: Name, algorithm: TsigAlgorithm },
    /// The key file's syntax: a line number and what was expected there.
    #[error("{0}")]
    KeySyntax(String),
    #[error(
        "key {key:?}: algorithm {algorithm:?} is not supported (use hmac-sha256, hmac-sha384 or hmac-sha512)"
    )]
    KeyAlgorithm { key: String, algorithm: String },
    #[error("key {0:?}: the secret is not valid base64")]
    SecretNotBase64(String),
    #[error("TSIG key file {}: cannot read it ({})", path.display(), source.kind())]
    KeyFileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TSIG key file {}: is not UTF-8 text", .0.display())]
    KeyFileNotUtf8(PathBuf),
    /// The file holds no usable key; `why` is the message of the parser's error.
    #[error("TSIG key file {}: {why}", path.display())]
    KeyFile { path: PathBuf, why: String },

    #[error("vm name {vm} does not fit in zone {zone}")]
    NameOutsideZone {
        vm: VmName,
        zone: String,
        #[source]
        source: ProtoError,
    },
    #[error("{ip} is outside reverse zone {zone}")]
    OutsideReverseZone { ip: IpAddr, zone: String },

    #[error("{what}: cannot sign the message")]
    Sign {
        what: String,
        #[source]
        source: ProtoError,
    },
    #[error("{what}: cannot encode the message")]
    Encode {
        what: String,
        #[source]
        source: ProtoError,
    },
    #[error("{what}: DNS server {server} did not answer in time (zone {zone})")]
    NoAnswer {
        what: String,
        server: SocketAddr,
        zone: String,
        #[source]
        source: NetError,
    },
    #[error("{what}: bad exchange with DNS server {server} (zone {zone})")]
    BadExchange {
        what: String,
        server: SocketAddr,
        zone: String,
        #[source]
        source: NetError,
    },
    #[error("{what}: DNS server {server} is unreachable (zone {zone})")]
    Unreachable {
        what: String,
        server: SocketAddr,
        zone: String,
        #[source]
        source: NetError,
    },
    #[error("{what}: malformed answer for zone {zone}")]
    Malformed {
        what: String,
        zone: String,
        #[source]
        source: DecodeError,
    },
    #[error("{what}: TSIG rejected for zone {zone}: {}", tsig_why(*error))]
    TsigRejected {
        what: String,
        zone: String,
        error: TsigError,
    },
    #[error("{what}: the answer for zone {zone} is not signed with the TSIG key")]
    Unsigned { what: String, zone: String },

    #[error("{what}: zone {zone} changed meanwhile; a prerequisite failed ({code})")]
    PrerequisiteFailed {
        what: String,
        zone: String,
        code: ResponseCode,
    },
    #[error("{what}: the server is not authoritative for zone {zone} (NOTAUTH)")]
    NotAuthoritative { what: String, zone: String },
    #[error("{what}: the server rejected the TSIG key for zone {zone} (NOTAUTH)")]
    KeyRejected { what: String, zone: String },
    #[error(
        "{what}: the server refused it for zone {zone} (REFUSED: the key may not update \
         the zone, or the server does not serve it)"
    )]
    UpdateRefused { what: String, zone: String },
    #[error(
        "{what}: the server refused it for zone {zone} (REFUSED: the server does not \
         serve the zone, or does not answer this client)"
    )]
    QueryRefused { what: String, zone: String },
    #[error("{what}: a name is outside zone {zone} (NOTZONE)")]
    NotZone { what: String, zone: String },
    #[error("{what}: the server failed for zone {zone} (SERVFAIL)")]
    ServFail { what: String, zone: String },
    #[error("{what}: the server answered {code} for zone {zone}")]
    Rcode {
        what: String,
        zone: String,
        code: ResponseCode,
    },

    #[error("{fqdn} already points to {other} in zone {zone}")]
    AddressTaken {
        fqdn: String,
        other: IpAddr,
        zone: String,
    },
    #[error("{ip} already points to {other} in zone {zone}")]
    PtrTaken {
        ip: IpAddr,
        other: String,
        zone: String,
    },
    /// The PTR update failed (`source`, whose kind and retryability this error keeps), and
    /// so did taking back the address record added just before (`undo`).
    #[error(
        "{}; the {rtype} record {fqdn} -> {ip} just added is still published ({})",
        source.message(),
        undo.message()
    )]
    AddressLeft {
        rtype: RecordType,
        fqdn: String,
        ip: IpAddr,
        undo: Box<Error>,
        #[source]
        source: Box<Error>,
    },
}

/// Why the server rejected the TSIG of a message, in words.
fn tsig_why(error: TsigError) -> String {
    match error {
        TsigError::BadKey => "the server does not know the key (BADKEY)".to_owned(),
        TsigError::BadSig => "the key's secret is wrong (BADSIG)".to_owned(),
        TsigError::BadTime => "the clocks differ too much (BADTIME)".to_owned(),
        other => format!("TSIG error {}", u16::from(other)),
    }
}

impl BackendError for Rfc2136Error {
    const BACKEND: &'static str = super::BACKEND;

    fn kind(&self) -> ErrorKind {
        use Rfc2136Error::*;
        match self {
            PortClash { .. }
            | ServerNotIp(_)
            | BadZone { .. }
            | TtlTooLarge(_)
            | ZeroTimeout
            | UnknownAlgorithm(_)
            | BadKeyName { .. }
            | EmptySecret(_)
            | SignerAlgorithm { .. }
            | KeySyntax(_)
            | KeyAlgorithm { .. }
            | SecretNotBase64(_)
            | KeyFileRead { .. }
            | KeyFileNotUtf8(_)
            | KeyFile { .. }
            | NameOutsideZone { .. }
            | OutsideReverseZone { .. }
            | NotAuthoritative { .. }
            | NotZone { .. } => ErrorKind::InvalidInput,
            Sign { .. } | Encode { .. } | BadExchange { .. } | Malformed { .. } | Rcode { .. } => {
                ErrorKind::Backend
            }
            NoAnswer { .. } => ErrorKind::Timeout,
            Unreachable { .. } | ServFail { .. } => ErrorKind::Unavailable,
            TsigRejected { .. }
            | Unsigned { .. }
            | KeyRejected { .. }
            | UpdateRefused { .. }
            | QueryRefused { .. } => ErrorKind::Unauthorized,
            PrerequisiteFailed { .. } | AddressTaken { .. } | PtrTaken { .. } => {
                ErrorKind::Conflict
            }
            AddressLeft { source, .. } => source.kind(),
        }
    }

    fn retryable(&self) -> Option<bool> {
        match self {
            Rfc2136Error::AddressLeft { source, .. } => Some(source.is_retryable()),
            _ => None,
        }
    }
}
