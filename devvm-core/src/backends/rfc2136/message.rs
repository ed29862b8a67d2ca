//! Sans-I/O DNS messages: names, records, the update and query messages, and the
//! checks of an answer.

use super::*;

/// Parses a domain name given in text (`lab.devvm.test`, with or without the trailing
/// dot) into a lower-case fully qualified name; the reason when it is not one.
pub(super) fn parse_dns_name(text: &str) -> std::result::Result<Name, &'static str> {
    let t = text.trim();
    let t = t.strip_suffix('.').unwrap_or(t);
    if t.is_empty() {
        return Err("is empty");
    }
    // Host-name characters only (plus `_`, as in key names and service labels).
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !t.split('.').all(label_ok) {
        return Err("is not a valid domain name");
    }
    let mut name = Name::from_ascii(t).map_err(|_| "is not a valid domain name")?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

pub(super) fn parse_zone(text: &str, what: &'static str) -> Result<Name> {
    parse_dns_name(text).map_err(|why| {
        Rfc2136Error::BadZone {
            what,
            text: shown(text),
            why,
        }
        .into()
    })
}

/// A name as text, without the trailing dot.
pub(super) fn without_dot(name: &Name) -> String {
    let s = name.to_ascii();
    match s.strip_suffix('.') {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => s,
    }
}

/// The record type of an address: A for IPv4, AAAA for IPv6.
pub(super) fn address_type(ip: IpAddr) -> RecordType {
    match ip {
        IpAddr::V4(_) => RecordType::A,
        IpAddr::V6(_) => RecordType::AAAA,
    }
}

/// The reverse-lookup name of `ip` (`7.0.99.10.in-addr.arpa.`).
pub(super) fn reverse_name(ip: IpAddr) -> Name {
    let mut name = Name::from(ip);
    name.set_fqdn(true);
    name
}

/// The default reverse zone of `ip`: its /24 for IPv4, its /64 for IPv6.
pub(super) fn default_reverse_zone(ip: IpAddr) -> Name {
    let name = reverse_name(ip);
    // The reverse name has 4 (IPv4) or 32 (IPv6) address labels plus two suffix labels.
    let keep = match ip {
        IpAddr::V4(_) => 3 + 2,
        IpAddr::V6(_) => 16 + 2,
    };
    let mut zone = name.trim_to(keep);
    zone.set_fqdn(true);
    zone
}

/// The address record `name A ip` (AAAA for IPv6) in class IN.
pub(super) fn address_record(name: Name, ip: IpAddr, ttl: u32) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, ttl, data)
}

/// The record `ptr_name PTR target` in class IN.
pub(super) fn ptr_record(ptr_name: Name, target: Name, ttl: u32) -> Record {
    Record::from_rdata(ptr_name, ttl, RData::PTR(PTR(target)))
}

/// An empty UPDATE message for `zone` (class IN).
pub(super) fn update_message(zone: &Name) -> Message {
    let mut zone_section = Query::query(zone.clone(), RecordType::SOA);
    zone_section.set_query_class(DNSClass::IN);
    let mut message = Message::query();
    message.metadata.op_code = OpCode::Update;
    message.metadata.recursion_desired = false;
    message.add_zone(zone_section);
    message
}

/// The UPDATE that adds `record` to `zone` only if no RRset of its name and type exists
/// (prerequisite "RRset does not exist", RFC 2136 §2.4.3: class NONE, TTL 0, no data).
pub(super) fn add_if_absent_update(zone: &Name, record: Record) -> Message {
    let mut message = update_message(zone);
    let mut prerequisite = Record::update0(record.name.clone(), 0, record.record_type());
    prerequisite.dns_class = DNSClass::NONE;
    message.add_pre_requisite(prerequisite);
    message.add_update(record);
    message
}

/// The UPDATE that deletes exactly `record` (name, type and data) from `zone` (RFC 2136
/// §2.5.4: class NONE, TTL 0). Deleting an absent record changes nothing.
pub(super) fn delete_record_update(zone: &Name, mut record: Record) -> Message {
    let mut message = update_message(zone);
    record.dns_class = DNSClass::NONE;
    record.ttl = 0;
    message.add_update(record);
    message
}

/// A standard query for `name`/`rtype`, class IN, no recursion.
pub(super) fn query_message(name: &Name, rtype: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = false;
    message.add_query(Query::query(name.clone(), rtype));
    message
}

/// How a non-success answer of the server maps to an [`Error`].
pub(super) fn rcode_error(
    code: ResponseCode,
    verified: bool,
    is_update: bool,
    zone: &str,
    what: &str,
) -> Error {
    let (what, zone) = (what.to_owned(), zone.to_owned());
    match code {
        ResponseCode::YXRRSet
        | ResponseCode::YXDomain
        | ResponseCode::NXRRSet
        | ResponseCode::NXDomain
            if is_update =>
        {
            Rfc2136Error::PrerequisiteFailed { what, zone, code }
        }
        ResponseCode::NotAuth if verified => Rfc2136Error::NotAuthoritative { what, zone },
        ResponseCode::NotAuth => Rfc2136Error::KeyRejected { what, zone },
        ResponseCode::Refused if is_update => Rfc2136Error::UpdateRefused { what, zone },
        ResponseCode::Refused => Rfc2136Error::QueryRefused { what, zone },
        ResponseCode::NotZone => Rfc2136Error::NotZone { what, zone },
        ResponseCode::ServFail => Rfc2136Error::ServFail { what, zone },
        code => Rfc2136Error::Rcode { what, zone, code },
    }
    .into()
}

/// Checks an answer: a TSIG error is `Unauthorized`; an error rcode maps by
/// [`rcode_error`]; success counts only when the answer's TSIG verifies with our key.
pub(super) fn check_answer(
    bytes: &[u8],
    verifier: Option<TSigVerifier>,
    ok_codes: &[ResponseCode],
    is_update: bool,
    zone: &str,
    what: &str,
) -> Result<Message> {
    let message = Message::from_vec(bytes).map_err(|source| Rfc2136Error::Malformed {
        what: what.to_owned(),
        zone: zone.to_owned(),
        source,
    })?;
    if let Some(error) = message.signature().and_then(|tsig| tsig.data.error) {
        return Err(Rfc2136Error::TsigRejected {
            what: what.to_owned(),
            zone: zone.to_owned(),
            error,
        }
        .into());
    }
    let verified = verifier.is_some_and(|mut v| v.verify(bytes).is_ok());
    if !ok_codes.contains(&message.metadata.response_code) {
        return Err(rcode_error(
            message.metadata.response_code,
            verified,
            is_update,
            zone,
            what,
        ));
    }
    if !verified {
        return Err(Rfc2136Error::Unsigned {
            what: what.to_owned(),
            zone: zone.to_owned(),
        }
        .into());
    }
    Ok(message)
}

pub(super) fn seconds_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
