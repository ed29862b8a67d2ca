//! The RFC 2136 DNS backend against the lab's real BIND 9.
//!
//! Runs inside `scripts/lab exec` (scripts/test does this); skips with a message when the
//! lab is not up. Each test uses its own addresses in 10.99.0.200–10.99.0.250 and its own
//! VM names, so the tests can run in parallel; each first clears what an interrupted
//! earlier run may have left on its addresses.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use devvm_core::backends::rfc2136::{Rfc2136Config, Rfc2136Dns};
use devvm_core::testkit::conformance::{DnsUpdaterFixture, dns_updater};
use devvm_core::testkit::unique_vm_name;
use devvm_core::{DnsUpdater, ErrorKind, VmName};
use devvm_tests::Lab;

/// A config for the lab's server, zones and key, with `extra` TOML lines replacing or
/// adding keys.
fn config(lab: &Lab, overrides: &[(&str, &str)]) -> Rfc2136Config {
    let mut table = toml::Table::new();
    let mut set = |k: &str, v: toml::Value| {
        table.insert(k.to_owned(), v);
    };
    set("server", lab.var("dns_server").into());
    set(
        "port",
        i64::from(lab.var("dns_port").parse::<u16>().unwrap_or(53)).into(),
    );
    set("zone", lab.var("dns_zone").into());
    set("reverse_zone", lab.var("dns_reverse_zone").into());
    set("key_file", lab.var("tsig_key_file").into());
    set("ttl", 60.into());
    set("timeout_secs", 3.into());
    for (k, v) in overrides {
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .unwrap_or_else(|e| panic!("{k} = {v}: {e}"))
            .remove("v")
            .unwrap_or_else(|| panic!("{k}"));
        set(k, value);
    }
    toml::Value::Table(table).try_into().expect("config")
}

fn dns(lab: &Lab, overrides: &[(&str, &str)]) -> Rfc2136Dns {
    Rfc2136Dns::from_config(&config(lab, overrides), Path::new("/"))
        .expect("RFC 2136 DNS from the config")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// What `dig @server +short` says, one answer per line.
fn dig(lab: &Lab, args: &[&str]) -> Vec<String> {
    run_dig(lab, "+short", args)
}

/// The answer section as `dig @server +noall +answer` prints it.
fn dig_full(lab: &Lab, args: &[&str]) -> Vec<String> {
    run_dig(lab, "+noall", &[&["+answer"], args].concat())
}

fn run_dig(lab: &Lab, style: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new("dig")
        .arg(format!("@{}", lab.var("dns_server")))
        .args([
            "-p",
            lab.var("dns_port"),
            style,
            "+norec",
            "+time=3",
            "+tries=1",
        ])
        .args(args)
        .output()
        .expect("run dig");
    assert!(
        out.status.success(),
        "dig {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(str::to_owned)
        .collect()
}

fn dig_a(lab: &Lab, fqdn: &str) -> Vec<String> {
    dig(lab, &[fqdn, "A"])
}

fn dig_ptr(lab: &Lab, addr: IpAddr) -> Vec<String> {
    dig(lab, &["-x", &addr.to_string()])
}

/// Removes whatever a previous, interrupted run left on `addrs` (PTRs naming VMs of the
/// lab zone, and their A records).
async fn clear(dns: &Rfc2136Dns, addrs: &[IpAddr]) {
    let suffix = format!(".{}", dns.zone());
    for &addr in addrs {
        let names = dns
            .reverse(addr)
            .await
            .unwrap_or_else(|e| panic!("clear {addr}: {e}"));
        for name in names {
            if let Some(vm) = name
                .strip_suffix(&suffix)
                .and_then(|label| VmName::new(label).ok())
            {
                dns.remove(&vm, addr)
                    .await
                    .unwrap_or_else(|e| panic!("clear {name} {addr}: {e}"));
            }
        }
    }
}

/// A key file holding `name` with a fresh secret the server does not know.
fn foreign_key_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.key"));
    let out = Command::new("tsig-keygen")
        .args(["-a", "hmac-sha256", name])
        .output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        // Without BIND's tools: a fixed secret, which is not the lab's random one.
        _ => format!(
            "key \"{name}\" {{\n\talgorithm hmac-sha256;\n\tsecret \"q1fF3mQb2kK8m7Yw0oQ4yC0Q8m7s3lJq9l1gkq2cN7E=\";\n}};\n"
        ),
    };
    std::fs::write(&path, text).expect("write key");
    path
}

#[tokio::test]
async fn rfc2136_dns_conforms() {
    let Some(lab) = Lab::get("rfc2136_dns_conforms") else {
        return;
    };
    let dns = dns(&lab, &[]);
    let addresses = [ip("10.99.0.201"), ip("10.99.0.202")];
    clear(&dns, &addresses).await;
    dns_updater(Arc::new(dns), DnsUpdaterFixture { addresses }).await;
}

#[tokio::test]
async fn rfc2136_dns_conforms_with_a_derived_reverse_zone() {
    let Some(lab) = Lab::get("rfc2136_dns_conforms_with_a_derived_reverse_zone") else {
        return;
    };
    let mut c = config(&lab, &[]);
    c.reverse_zone = None;
    let dns = Rfc2136Dns::from_config(&c, Path::new("/")).unwrap();
    let addresses = [ip("10.99.0.203"), ip("10.99.0.204")];
    clear(&dns, &addresses).await;
    dns_updater(Arc::new(dns), DnsUpdaterFixture { addresses }).await;
}

#[tokio::test]
async fn published_records_are_what_dig_sees() {
    let Some(lab) = Lab::get("published_records_are_what_dig_sees") else {
        return;
    };
    let dns = dns(&lab, &[]);
    let addr = ip("10.99.0.211");
    clear(&dns, &[addr]).await;
    let vm = unique_vm_name("dig");
    let fqdn = dns.fqdn(&vm);
    assert_eq!(fqdn, format!("{vm}.{}", lab.var("dns_zone")));

    let rec = dns.publish(&vm, addr).await.unwrap();
    assert_eq!((rec.fqdn.as_str(), rec.ip), (fqdn.as_str(), addr));
    assert_eq!(dig_a(&lab, &fqdn), vec![addr.to_string()]);
    assert_eq!(dig_ptr(&lab, addr), vec![format!("{fqdn}.")]);
    let answer = dig_full(&lab, &[&fqdn, "A"]);
    assert!(
        answer
            .iter()
            .any(|l| l.split_whitespace().nth(1) == Some("60")),
        "the A record has the configured TTL: {answer:?}"
    );

    // Publishing again succeeds and leaves exactly one record of each.
    let again = dns.publish(&vm, addr).await.unwrap();
    assert_eq!(again, rec);
    assert_eq!(dig_a(&lab, &fqdn), vec![addr.to_string()]);
    assert_eq!(dig_ptr(&lab, addr), vec![format!("{fqdn}.")]);

    dns.remove(&vm, addr).await.unwrap();
    assert!(dig_a(&lab, &fqdn).is_empty());
    assert!(dig_ptr(&lab, addr).is_empty());
}

#[tokio::test]
async fn a_wrong_secret_is_unauthorized_and_changes_nothing() {
    let Some(lab) = Lab::get("a_wrong_secret_is_unauthorized_and_changes_nothing") else {
        return;
    };
    let good = dns(&lab, &[]);
    let (kept, fresh) = (ip("10.99.0.221"), ip("10.99.0.222"));
    clear(&good, &[kept, fresh]).await;
    let owner = unique_vm_name("keep");
    good.publish(&owner, kept).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let key = foreign_key_file(dir.path(), lab.var("tsig_key_name"));
    let key = key.to_string_lossy().into_owned();
    let bad = dns(&lab, &[("key_file", &format!("{key:?}"))]);
    assert_eq!(bad.key_name(), lab.var("tsig_key_name"));

    let vm = unique_vm_name("badsig");
    let err = bad.publish(&vm, fresh).await.expect_err("wrong secret");
    eprintln!("{err}");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(lab.var("dns_zone")), "{err}");
    let err = bad.remove(&owner, kept).await.expect_err("wrong secret");
    eprintln!("{err}");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");

    // Nothing changed on the server.
    assert!(dig_a(&lab, &bad.fqdn(&vm)).is_empty());
    assert!(dig_ptr(&lab, fresh).is_empty());
    assert_eq!(dig_a(&lab, &good.fqdn(&owner)), vec![kept.to_string()]);
    assert_eq!(dig_ptr(&lab, kept), vec![format!("{}.", good.fqdn(&owner))]);

    good.remove(&owner, kept).await.unwrap();
}

#[tokio::test]
async fn a_key_with_another_name_is_unauthorized() {
    let Some(lab) = Lab::get("a_key_with_another_name_is_unauthorized") else {
        return;
    };
    let good = dns(&lab, &[]);
    let addr = ip("10.99.0.225");
    clear(&good, &[addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = foreign_key_file(dir.path(), "not-the-lab-key");
    let key = key.to_string_lossy().into_owned();
    let bad = dns(&lab, &[("key_file", &format!("{key:?}"))]);
    let vm = unique_vm_name("badkey");
    let err = bad.publish(&vm, addr).await.expect_err("unknown key");
    eprintln!("{err}");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    let err = bad.remove(&vm, addr).await.expect_err("unknown key");
    eprintln!("{err}");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(dig_a(&lab, &bad.fqdn(&vm)).is_empty());
    assert!(dig_ptr(&lab, addr).is_empty());
}

#[tokio::test]
async fn a_zone_the_server_does_not_serve_is_a_typed_error() {
    let Some(lab) = Lab::get("a_zone_the_server_does_not_serve_is_a_typed_error") else {
        return;
    };
    let good = dns(&lab, &[]);
    let addr = ip("10.99.0.231");
    clear(&good, &[addr]).await;
    let elsewhere = dns(&lab, &[("zone", "\"elsewhere.test\"")]);
    let vm = unique_vm_name("elsewhere");
    let err = elsewhere.publish(&vm, addr).await.expect_err("not served");
    eprintln!("{err}");
    // BIND answers REFUSED for a zone it does not serve (mapped to Unauthorized).
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(err.to_string().contains("elsewhere.test"), "{err}");
    assert!(!err.is_retryable());
    let err = elsewhere.remove(&vm, addr).await.expect_err("not served");
    eprintln!("{err}");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Unauthorized | ErrorKind::InvalidInput
        ),
        "{err}"
    );
    assert!(dig_ptr(&lab, addr).is_empty(), "no PTR was made");
}

#[tokio::test]
async fn a_failed_ptr_update_takes_the_a_record_back() {
    let Some(lab) = Lab::get("a_failed_ptr_update_takes_the_a_record_back") else {
        return;
    };
    let good = dns(&lab, &[]);
    let addr = ip("10.99.0.241");
    clear(&good, &[addr]).await;
    // A reverse zone that contains the address but that the server does not serve: the
    // PTR lookup is answered (from the real 0.99.10.in-addr.arpa), the PTR update is not.
    let parent = lab
        .var("dns_reverse_zone")
        .split_once('.')
        .map(|(_, parent)| parent.to_owned())
        .expect("reverse zone");
    let dns = dns(&lab, &[("reverse_zone", &format!("{parent:?}"))]);
    let vm = unique_vm_name("undo");
    let err = dns.publish(&vm, addr).await.expect_err("ptr update fails");
    eprintln!("{err}");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::InvalidInput | ErrorKind::Unauthorized
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&parent), "{err}");
    assert!(
        dig_a(&lab, &dns.fqdn(&vm)).is_empty(),
        "the A record was taken back"
    );
    assert!(dig_ptr(&lab, addr).is_empty());
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_retryable() {
    let Some(lab) = Lab::get("an_unreachable_server_is_unavailable_and_retryable") else {
        return;
    };
    let dns = dns(
        &lab,
        &[
            ("server", "\"127.0.0.1\""),
            ("port", "1"),
            ("timeout_secs", "2"),
        ],
    );
    let vm = unique_vm_name("down");
    for err in [
        dns.publish(&vm, ip("10.99.0.249")).await.expect_err("down"),
        dns.resolve(&vm).await.expect_err("down"),
        dns.remove(&vm, ip("10.99.0.249")).await.expect_err("down"),
    ] {
        eprintln!("{err}");
        assert!(
            matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
            "{err}"
        );
        assert!(err.is_retryable(), "{err}");
        assert_eq!(err.backend_name(), Some("rfc2136"));
    }
}

/// Names that could smuggle DNS syntax never reach the backend: `VmName` refuses them.
#[test]
fn invalid_vm_names_are_rejected() {
    let long = "a".repeat(64);
    for bad in [
        "*", "(", ")", "\\", "a\0b", "\0", "é", "wéb", "", "a.b", "a b", "-a", "a-", &long, "a;b",
        "a\"b", "@",
    ] {
        let err = VmName::new(bad).expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}: {err}");
    }
    assert!(VmName::new("a".repeat(63)).is_ok());
    assert!(VmName::new("web-1").is_ok());
}
